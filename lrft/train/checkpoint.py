"""Training checkpoints that resume exactly: ``run_dir/checkpoints/step-N/``.

A checkpoint holds the trainable state (never the frozen base), optimizer and scheduler state, the
step, the epoch and the position inside it, the sampler seed and every RNG state (python, numpy,
torch, CUDA; one file per rank). It is written to a temporary folder, flushed, renamed, and marked
complete last with a manifest of sha256 sums; resume ignores folders without the mark and falls
back past files whose sums no longer match.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import Method
from lrft.run.atomic import StagedDir
from lrft.run.final import COMPLETE, TRAINABLE, load_state, method_config, save_state
from lrft.train import faults

OPTIM = "optim.pt"
STATE = "state.json"


@dataclass
class Position:
    """Where the loop stands after ``step`` optimizer steps."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    world_size: int = 1


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _state_bytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(_state_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(_state_bytes(v) for v in tensors)
    return 0


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run."""
    return {
        "method": dict(cfg.method),
        "model": {"name": cfg.model.name, "name_or_path": cfg.model.name_or_path},
        "dataset": cfg.dataset.name,
        "quantization": cfg.quantization.name,
    }


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    pos: Position,
    rng: dict[str, Any],
    cfg: DictConfig,
    method: Method,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    writer: bool | None = None,
) -> Path | None:
    """Write ``checkpoints/step-N`` atomically (every rank calls this; rank files are per rank).

    ``writer``: whether this process writes the shared files (trainable, optimizer, manifest):
    global rank 0 by default; on node-local disks each node's local rank 0 (:mod:`lrft.run.topology`).
    """
    final = run_dir / "checkpoints" / f"step-{pos.step:08d}"
    # one staging name every rank computes: each writes its own files into it before the commit
    stage = StagedDir(final, shared=True, mark_text=_manifest)  # the mark: sha256 of every file
    tmp = stage.path
    trainable = gather_trainable(accelerator, model, method)
    writer = accelerator.is_main_process if writer is None else writer
    per_rank = optimizer_per_rank(accelerator, model)
    optim_state = optimizer.state_dict()
    if per_rank:  # this rank's shard of the optimizer state: one file per rank
        from lrft.train.sharding import local_optimizer_state

        optim_state = local_optimizer_state(optim_state)
    if writer:
        need = 3 * _state_bytes(trainable) + _state_bytes(optim_state) * (2 if per_rank else 1)
        need += int(need * 0.05) + (1 << 20)  # headers and the small files: not a fixed 16 MiB
        final.parent.mkdir(parents=True, exist_ok=True)
        have = free_bytes(final.parent)
        if have < need:
            raise UserError(
                f"Not enough disk space for checkpoint step {pos.step} in {final.parent}: about "
                f"{need / 2**20:.0f} MiB needed, {have / 2**20:.0f} MiB free. Nothing was written; the "
                "previous checkpoints are intact. Free space, or set trainer.save_every=0."
            )
        stage.open()  # removes what a process killed while saving left
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / f"rng_rank{accelerator.process_index}.pt")
    if per_rank:
        torch.save({"optimizer": optim_state}, tmp / optim_rank_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if not writer:
        accelerator.wait_for_everyone()
        return None
    save_state(trainable, tmp / TRAINABLE)
    faults.maybe("kill_in_save", pos.step)
    shared = {"scheduler": scheduler.state_dict()}
    if not per_rank:  # data parallel: every rank's optimizer state is the same; one copy
        shared["optimizer"] = optim_state
    torch.save(shared, tmp / OPTIM)
    meta = {
        "position": asdict(pos),
        "identity": identity(cfg),
        "method": method_config(method),
        "optimizer_per_rank": per_rank,
    }
    (tmp / STATE).write_text(json.dumps(meta, indent=2))
    _verify_shapes(tmp / TRAINABLE, trainable)
    stage.commit()  # flushed, renamed into place, the manifest mark written last
    keep = cfg.trainer.keep_checkpoints
    done = complete_checkpoints(run_dir)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _manifest(folder: Path) -> str:
    return json.dumps({f.name: _sha256(f) for f in sorted(folder.iterdir())}, indent=1)


def optim_rank_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def optimizer_per_rank(accelerator: Any, model: nn.Module) -> bool:
    """Whether each rank holds its own share of the optimizer state (FSDP2): then
    each rank saves and loads its own file; under data parallel one copy serves every rank."""
    from lrft.train.sharding import is_sharded

    return is_sharded(accelerator.unwrap_model(model))


def gather_trainable(accelerator: Any, model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    """The method's trainable state as full tensors, on every rank: under FSDP2 each rank holds a
    dim-0 shard of every parameter. Only the trainable tensors are gathered (a collective: every
    rank calls this), never the whole model's state dict."""
    from lrft.train.sharding import whole

    unwrapped = accelerator.unwrap_model(model)
    return {k: whole(v).detach().clone() for k, v in method.trainable_state_dict(unwrapped).items()}


def _verify_shapes(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Never leave an empty or truncated adapter behind (sharded models can gather to nothing)."""
    got = load_state(path)
    bad = [k for k, v in expected.items() if k not in got or got[k].shape != v.shape or v.numel() == 0]
    if bad:
        raise RuntimeError(f"checkpoint {path} lost or emptied tensors: {bad[:5]}")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def _intact(ckpt: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((ckpt / COMPLETE).read_text())
    except (OSError, ValueError):
        return "its completion mark is unreadable"
    for name, digest in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def find_checkpoint(run_dir: Path, resume: str, accelerator: Any = None) -> Path | None:
    """``auto``: the newest intact checkpoint in ``run_dir`` (None if there is none); else a path.

    With several processes (``accelerator``), ``auto`` takes the newest step that every process
    has intact: on node-local disks a node may have lost its newest one (a collective)."""
    if resume != "auto":
        ckpt = Path(resume)
        if not (ckpt / COMPLETE).is_file():
            raise UserError(
                f"trainer.resume={resume}: not a complete checkpoint folder (no {COMPLETE} mark)."
            )
        problem = _intact(ckpt)
        if problem:
            raise UserError(f"trainer.resume={resume}: cannot resume, {problem}.")
        return ckpt
    many = accelerator is not None and accelerator.num_processes > 1
    if not (run_dir / "checkpoints").is_dir() and not many:
        return None
    for stale in (run_dir / "checkpoints").glob(".tmp-*"):
        warnings.warn(
            f"ignoring unfinished checkpoint {stale} (the process stopped while saving it)", stacklevel=2
        )
        shutil.rmtree(stale, ignore_errors=True)
    done = complete_checkpoints(run_dir)
    for unmarked in sorted(set((run_dir / "checkpoints").glob("step-*")) - set(done)):
        warnings.warn(
            f"removing unfinished checkpoint {unmarked}: it has no completion mark (the process "
            "stopped while saving it)",
            stacklevel=2,
        )
        shutil.rmtree(unmarked, ignore_errors=True)  # lrft's own half-write, like .tmp-* above
    unusable: list[tuple[Path, str]] = []
    intact = []
    for ckpt in reversed(done):
        problem = _intact(ckpt)
        if problem is None:
            intact.append(ckpt)
            if not many:
                break  # the newest intact one is the answer
        else:
            unusable.append((ckpt, problem))
            warnings.warn(f"skipping checkpoint {ckpt}: {problem}; trying an older one", stacklevel=2)
    if many:
        from lrft.run.topology import agree_on_checkpoint, any_process

        found = agree_on_checkpoint(accelerator, run_dir, intact)
        if found is None and any_process(accelerator, bool(unusable)):  # every rank refuses alike
            _none_usable(run_dir, unusable)
        return found
    if not intact and unusable:
        _none_usable(run_dir, unusable)
    return intact[0] if intact else None


def _none_usable(run_dir: Path, unusable: list[tuple[Path, str]]) -> None:
    """Checkpoints exist but none can be resumed from: starting over silently would throw away the
    steps they held and mix two histories in metrics.jsonl, so the user decides (issue 24, 9)."""
    from lrft.config import source
    from lrft.run.folder import saved_overrides

    listing = "\n  ".join(f"{p.name}: {why}" for p, why in sorted(unusable)) or "(on another process)"
    keep = [o for o in saved_overrides(run_dir) or [] if not o.lstrip("+").startswith("trainer.resume=")]
    composed = source.saved(run_dir) or source.Source()  # its --config-dir / --config-name too
    again = composed.command_line([*keep, "trainer.overwrite=true"])
    raise UserError(
        f"trainer.resume=auto: no checkpoint in {run_dir} can be resumed from:\n  {listing}\n"
        "Nothing was changed. Restore a checkpoint from a copy and resume again, or start the run "
        f"over from step 0 (this removes the files lrft wrote there):\n  {again}"
    )


def restore_trainable(ckpt: Path, cfg: DictConfig, method: Method, model: nn.Module) -> None:
    """The checkpoint's trainable weights into the (not yet sharded or wrapped) model, after its
    identity is checked: before sharding, every rank loads whole tensors the plain way."""
    meta = json.loads((ckpt / STATE).read_text())
    mine, theirs = identity(cfg), meta["identity"]
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]]
    if diff:
        raise UserError(f"Cannot resume from {ckpt}: the run differs.\n  " + "\n  ".join(diff))
    method.load_trainable(model, load_state(ckpt / TRAINABLE))


def load_checkpoint(
    ckpt: Path, accelerator: Any, optimizer: Any, scheduler: Any
) -> tuple[Position, dict[str, Any]]:
    """Optimizer, scheduler and position (the weights came in through :func:`restore_trainable`);
    returns the position and this rank's RNG state."""
    meta = json.loads((ckpt / STATE).read_text())
    pos = Position(**meta["position"])
    per_rank = meta.get("optimizer_per_rank", False)
    if per_rank and pos.world_size != accelerator.num_processes:
        raise UserError(
            f"Cannot resume from {ckpt}: its optimizer state is split over {pos.world_size} processes "
            f"(sharded training) and this run has {accelerator.num_processes}. Resume with "
            f"{pos.world_size} processes."
        )
    if pos.world_size != accelerator.num_processes:
        warnings.warn(
            f"resuming a {pos.world_size}-process run with {accelerator.num_processes} processes: the "
            "global batch and the data order change from here on, so the run is no longer bit-identical "
            "to an uninterrupted one (the weights, optimizer and step carry over).",
            stacklevel=2,
        )
    state = _read(ckpt / OPTIM)
    if per_rank:
        from lrft.train.sharding import as_sharded_optimizer_state

        mine = _read(ckpt / optim_rank_file(accelerator.process_index))["optimizer"]
        optimizer.load_state_dict(as_sharded_optimizer_state(optimizer, mine))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if not rank_file.is_file():
        rank_file = ckpt / "rng_rank0.pt"
    rng = torch.load(rank_file, weights_only=True)
    return pos, rng


def _read(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise UserError(f"Cannot read {path}: {err}") from None


def truncate_metrics(metrics_file: Path, step: int) -> None:
    """Drop records past the resumed step: they are about to be produced again."""
    if not metrics_file.is_file():
        return
    keep = [line for line in metrics_file.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    metrics_file.write_text("".join(line + "\n" for line in keep))
