"""Where the processes of a job are, and who writes what where.

One machine or many, the launcher (torchrun, accelerate launch, srun + torchrun) sets RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; nothing here starts processes. What depends on the
topology is the run folder:

- shared filesystem (the usual case): exactly one process in the whole job, global rank 0, writes
  run files, metrics, checkpoints and the final state; every process reads the same folder.
- node-local disks (detected at start; ``trainer.shared_fs`` states what the user expects and is
  checked against it): each node's local rank 0 writes
  what its node needs to resume (config, its ranks' RNG states, the trainable and optimizer
  state) to its own disk; metrics and the final adapter go to global rank 0's disk. Resume picks
  the newest checkpoint that EVERY node has.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Topology:
    world_size: int = 1
    nodes: int = 1
    processes_per_node: int = 1
    node_rank: int = 0
    shared_fs: bool = True

    def writes_node_files(self, accelerator: Any) -> bool:
        """Whether this process writes its node's copy of run files and checkpoints."""
        if self.shared_fs:
            return bool(accelerator.is_main_process)
        return bool(accelerator.is_local_main_process)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def topology(accelerator: Any, run_dir: Path, shared_fs: bool | None) -> Topology:
    """The job's layout; ``shared_fs=None`` detects whether ``run_dir`` is one folder for all."""
    world = accelerator.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or world
    nodes = max(1, world // per_node)
    node = int(os.environ.get("GROUP_RANK", accelerator.process_index // per_node))
    if nodes == 1:
        return Topology(world, nodes, per_node, node, True)
    # always measured: a wrong claim either way would corrupt or scatter the run folder
    shared = _detect_shared(accelerator, run_dir)
    if shared_fs is True and not shared:
        from lrft.errors import UserError

        raise UserError(
            f"trainer.shared_fs=true, but {run_dir} is not the same folder on every node (a file written "
            "by global rank 0 is not visible everywhere). Put output_dir on a shared filesystem, or set "
            "trainer.shared_fs=false (each node keeps its own checkpoints)."
        )
    if shared_fs is False and shared and accelerator.is_main_process:
        import warnings

        warnings.warn(
            f"trainer.shared_fs=false, but {run_dir} is shared by every node: writing it once, from "
            "global rank 0 (several writers would race).",
            stacklevel=2,
        )
    return Topology(world, nodes, per_node, node, shared)


def _detect_shared(accelerator: Any, run_dir: Path) -> bool:
    """Global rank 0 leaves a token file in ``run_dir``; the folder is shared if every process
    sees it (a collective: every process calls this)."""
    import torch.distributed as dist

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    dist.broadcast_object_list(token, src=0)
    probe = run_dir / f".lrft-shared-fs-{token[0]}"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe\n")
    accelerator.wait_for_everyone()
    seen = [False] * accelerator.num_processes
    dist.all_gather_object(seen, probe.is_file())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    return all(seen)


def agree_on_checkpoint(accelerator: Any, run_dir: Path, candidates: list[Path]) -> Path | None:
    """The newest checkpoint step that every process can read (its node's intact copies), as this
    process's path; None if they share none. With one process: the newest candidate."""
    if accelerator.num_processes == 1:
        return candidates[0] if candidates else None
    import torch.distributed as dist

    steps = {p.name: p for p in candidates}
    everyone: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, sorted(steps))
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    return steps[max(common)] if common else None


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective with several)."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    everyone: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, bool(flag))
    return any(everyone)


# --- the launch: is this process the run it looks like? -------------------------------------------

_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world() -> int:
    """The number of processes the launcher says this job has (``WORLD_SIZE``; 1 without one).

    A process that sees ``WORLD_SIZE > 1`` without the rest of a launcher's environment (a
    variable left exported in a shell, a scheduler script that sets it by hand) would train alone
    while believing it is one of several: refused, before anything is read or written."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        world = int(raw)
    except ValueError:
        from lrft.errors import UserError

        raise UserError(f"WORLD_SIZE={raw!r} is not a number of processes.") from None
    missing = [v for v in _LAUNCH_VARS if not os.environ.get(v)]
    if world > 1 and missing:
        from lrft.errors import UserError

        raise UserError(
            f"WORLD_SIZE={world} says this is one of {world} processes, but {', '.join(missing)} "
            "is not set, so it would train alone and race the others on one run folder. Start "
            "the processes with a launcher (torchrun --nproc_per_node N -m lrft train ..., or "
            "accelerate launch), or unset WORLD_SIZE for a single-process run."
        )
    return max(1, world)


def use_cpu(requested: bool) -> bool:
    """accelerate's ``cpu`` flag: the request, or True for a multi-process launch on a machine
    with no accelerator. accelerate itself joins the launcher's process group on a CPU-only machine
    only when told ``cpu=True``; without it every process would run alone, as a 1-process run."""
    if requested:
        return True
    if launched_world() <= 1:
        return False
    import torch

    available = getattr(torch, "accelerator", None)
    return not (available.is_available() if available is not None else torch.cuda.is_available())


def check_world(accelerator: Any) -> None:
    """The run sees as many processes as the launcher started, or it stops here."""
    world = launched_world()
    if accelerator.num_processes != world:
        from lrft.errors import UserError

        raise UserError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but this run sees "
            f"{accelerator.num_processes} (accelerate: {accelerator.distributed_type}). They would be "
            f"{world} separate runs racing on one folder, so nothing was trained. On a CPU-only "
            "machine set trainer.cpu=true; on GPUs check that each process sees its device "
            "(CUDA_VISIBLE_DEVICES)."
        )
