"""Where a run stands: the position in the data, the step, and what resume must restore.

Resume is exact because the data order depends only on (seed, epoch) and every RNG is captured
with the position at the end of each optimizer step (see :mod:`lrft.train.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from lrft.train.checkpoint import Position, capture_rng


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): resume can replay any epoch's order exactly.

    Not named ``set_epoch`` on purpose: accelerate calls that with its own per-loader iteration
    count, which restarts at 0 for the loader that skips the batches already done.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainState:
    """Position, counters and the snapshot of the last completed step (what an interrupt saves).

    ``steps_per_epoch`` counts optimizer steps of the whole job per pass over the data; it is
    measured on the loader after ``accelerator.prepare`` has sharded it, so N processes with the
    same global batch take the same number of steps as one.
    """

    total: int
    steps_per_epoch: int
    pos: Position = field(default_factory=Position)
    skipped: int = 0  # steps whose update was dropped (non-finite loss with on_nan=skip)
    overflow: int = 0  # fp16 steps the GradScaler skipped (routine: the scale adapts)
    last_loss: float = float("nan")
    last_ckpt: str | None = None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    snapshot: tuple[Position, dict[str, Any]] | None = None

    def mark_complete(self) -> None:
        """The state after a finished optimizer step: what an interrupt or a checkpoint saves."""
        self.snapshot = (copy(self.pos), capture_rng())

    @property
    def done(self) -> bool:
        return self.pos.step >= self.total
