"""What ``lrft merge`` and ``lrft export`` share: composing the job, the finished run they read,
and the rules of the folder they write (only a folder lrft wrote may be replaced, free space,
progress of shards). Staging and renaming are :mod:`lrft.run.atomic`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lrft.errors import UserError
from lrft.run.atomic import staged_dir

MARKER = ".lrft-output"  # in every folder lrft merge / export writes: what an overwrite may replace
SHARD_DELAY_ENV = "LRFT_MERGE_SHARD_DELAY"  # test hook: seconds to sleep after each shard is written


def say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def check_plain_keys(folder: Path) -> None:
    """The written checkpoint must be a plain model: no adapter wrapper or factor names left."""
    from safetensors import safe_open

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            bad = [k for k in fh.keys() if "base_layer" in k or "lora_" in k]  # noqa: SIM118
        if bad:
            raise UserError(f"internal error: merged checkpoint still has adapter keys, e.g. {bad[0]}")


@contextmanager
def shard_progress() -> Iterator[None]:
    """Report each shard as ``save_pretrained`` writes it (and, for tests, pause after it)."""
    import transformers.modeling_utils as mu

    original: Callable[..., Any] | None = getattr(mu, "safe_save_file", None)
    if original is None:  # another transformers layout: no progress lines, same result
        yield
        return
    delay = float(os.environ.get(SHARD_DELAY_ENV) or 0)

    def save(tensors: dict[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any) -> Any:
        result = original(tensors, filename, *args, **kwargs)
        say(f"wrote shard {Path(filename).name}")
        if delay:
            time.sleep(delay)
        return result

    mu.safe_save_file = save
    try:
        yield
    finally:
        mu.safe_save_file = original


def resolve_run(checkpoint: str | Path) -> Path:
    """The run folder for ``checkpoint`` (RUN_DIR or RUN_DIR/final), checked to be finished."""
    run_dir = Path(checkpoint).expanduser().resolve()
    if run_dir.is_file():
        raise UserError(f"checkpoint={checkpoint} is a file: give the run folder (it holds config.yaml).")
    if run_dir.name == "final" and (run_dir.parent / "config.yaml").is_file():
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{checkpoint} is not an lrft run folder (no config.yaml).")
    if not (run_dir / "final" / "COMPLETE").is_file():
        raise UserError(f"{run_dir} has no complete final state: did its training finish?")
    return run_dir


def refuse_overlap(output: Path, *protected: str | Path | None) -> None:
    """An output that is, or holds, the run or the base would be replaced by what is read from it."""
    for path in protected:
        if path is not None and Path(path).exists():
            path = Path(path).resolve()
            if output == path or output in path.parents:
                raise UserError(f"output {output} would replace {path}, which this command reads.")


def refuse_inside_run(output: Path, command: str) -> None:
    """``lrft merge`` / ``lrft export`` never write into a run folder: its adapter/ and final/
    are the run's own (a merged model there would replace the adapter the run exported)."""
    for folder in (output, *output.parents):
        if (folder / "config.yaml").is_file() and (folder / "run_info.json").is_file():
            beside = folder.parent / f"{folder.name}-{command}d"
            raise UserError(
                f"output {output} is inside the run folder {folder}: lrft {command} never writes into "
                f"a run folder. Choose a folder outside it, e.g. output={beside}"
            )


def check_output(output: Path, overwrite: bool, flag: str = "export.overwrite") -> None:
    """Refuse a non-empty ``output`` unless ``overwrite`` and lrft wrote everything in it.

    lrft marks each folder it writes with :data:`MARKER`, listing its entries: only such a folder,
    with nothing added since, may be replaced. Nothing lrft did not write is ever deleted.
    """
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder.")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"output {output} is not empty ({_entries(output)}): choose another folder, or set "
            f"{flag}=true to replace a folder lrft wrote."
        )
    foreign = foreign_entries(output)
    if foreign:
        marked = (output / MARKER).is_file()
        what = "holds files lrft did not write" if marked else "was not written by lrft"
        raise UserError(
            f"output {output} {what}: {', '.join(foreign)}. {flag}=true replaces only a folder lrft "
            "wrote, so nothing was removed: move those files away or choose another folder."
        )


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that lrft's :data:`MARKER` does not list (all of them without one)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    try:
        written = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in written]


def _entries(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def mark_output(folder: Path, command: str) -> None:
    """Record that lrft wrote ``folder`` and what is in it: what a later overwrite may remove."""
    record = {
        "written_by": f"lrft {command}",
        "files": sorted(p.name for p in folder.iterdir() if p.name != MARKER),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def check_free_space(output: Path, need: int) -> None:
    """Refuse before writing when the output's disk cannot hold ``need`` bytes (plus a margin)."""
    where = output
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need * 1.05 + (64 << 20):
        raise UserError(
            f"{where} has {free / 2**30:.1f} GiB free; the output needs about {need / 2**30:.1f} GiB."
        )


@contextmanager
def staged_output(output: Path, overwrite: bool, flag: str = "export.overwrite") -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces ``output`` in one rename.

    ``output`` may be replaced only if lrft wrote it (see :func:`check_output`; ``flag`` is the
    key the message names); the new folder gets lrft's :data:`MARKER`, written inside it before
    the rename. Staging, flushing and renaming are :func:`lrft.run.atomic.staged_dir`'s: on an
    exception nothing stays behind, after a kill only a hidden ``.tmp-*`` sibling.
    """
    output = output.resolve()
    check_output(output, overwrite, flag)
    command = flag.partition(".")[0]
    with staged_dir(output, mark=None, seal=lambda tmp: mark_output(tmp, command)) as tmp:
        yield tmp
