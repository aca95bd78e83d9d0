"""Disk space for what a run writes at its two ends: the base weights of a random-init model
(before the first step) and the final state, PEFT adapter and summary (after the last).

Both are checked before anything is written, as checkpoints are, and a full disk met while writing
is a message that says what was kept and how to go on, never a traceback (issue 24, finding 5).
A failed final write leaves no ``final/``: the folder stays an unfinished run, its checkpoints
untouched, so ``trainer.resume=auto`` finishes it once there is space.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lrft.errors import UserError
from lrft.run.atomic import normal_modes
from lrft.train import checkpoint


def margin(need: int) -> int:
    """Room kept beyond an estimate: 5% for file headers and metadata, plus 1 MiB."""
    return int(need * 0.05) + (1 << 20)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _short(what: str, where: Path, need: int) -> str | None:
    have = checkpoint.free_bytes(where)
    if have >= need + margin(need):
        return None
    return f"Not enough disk space for {what} in {where}: about {_mib(need)} needed, {_mib(have)} free."


@contextmanager
def base_write(run_dir: Path, model: nn.Module) -> Iterator[None]:
    """Around saving ``run_dir/base`` (a random init exists nowhere else)."""
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    after = "Nothing was trained: free space and run the same command again."
    short = _short("the base weights", run_dir, need)
    if short:
        raise UserError(f"{short} {after}")
    try:
        yield
        normal_modes(run_dir / "base")  # readable like the rest of the run folder
    except OSError as err:
        shutil.rmtree(run_dir / "base", ignore_errors=True)
        raise UserError(f"Writing {run_dir / 'base'} failed: {err.strerror or err}. {after}") from None


@contextmanager
def final_write(run_dir: Path, state: dict[str, torch.Tensor], step: int) -> Iterator[None]:
    """Around writing ``final/``, ``adapter/`` and ``summary.json`` after step ``step``."""
    # the final state and the PEFT adapter each hold the trainable tensors; the tokenizer's files
    # beside them are not known before they are written (a full disk there is caught below)
    need = 2 * checkpoint._state_bytes(state) + (2 << 20)
    short = _short("the final state", run_dir, need)
    if short:
        raise UserError(f"{short} Nothing was written. {resume_hint(run_dir, step)}")
    try:
        yield
    except OSError as err:
        for name in ("final", "adapter", "summary.json"):  # lrft's own, half written
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise UserError(
            f"Writing the final state in {run_dir} failed: {err.strerror or err}. "
            + resume_hint(run_dir, step)
        ) from None


def resume_hint(run_dir: Path, step: int) -> str:
    """What is kept after a failed final write, and the command that finishes the run."""
    from lrft.run.folder import resume_command

    done = checkpoint.complete_checkpoints(run_dir)
    if not done:
        kept = (
            "No checkpoint was saved (trainer.save_every=0), so the run has to be trained again: "
            "free space and run the same command with trainer.overwrite=true."
        )
        return kept
    last = int(done[-1].name.removeprefix("step-"))
    redo = (
        "it writes the final state without training"
        if last == step
        else f"it retrains steps {last + 1}-{step} from it to the same weights (exact resume)"
    )
    return (
        f"The newest checkpoint, {done[-1].name}, is intact; free space, then resume ({redo}):\n"
        f"  {resume_command(run_dir)}"
    )
