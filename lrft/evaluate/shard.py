"""Evaluation split across processes: each rank scores every W-th batch, then the tallies merge.

Batches are formed exactly as in one process and only dealt out, so every number a batch
produces is the one a single process computes; merging adds sums (float64) and confusion
matrices (exact), and concatenates STS-B's scores (Spearman and Pearson do not depend on order).
"""

from __future__ import annotations

from typing import Any

from lrft.metrics import GlueMeter

Sums = dict[str, float]


class Shard:
    """Which batches this process evaluates, and how all processes' tallies combine."""

    def __init__(self, accelerator: Any = None) -> None:
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    def mine(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def merge(self, meter: GlueMeter | None, sums: Sums) -> tuple[GlueMeter | None, Sums]:
        """Every rank's meter and sums, combined (a collective: every rank calls it)."""
        if self.world == 1:
            return meter, sums
        from accelerate.utils import gather_object

        parts = gather_object([(meter, sums)])
        merged: Sums = {k: 0.0 for k in sums}
        for _, part_sums in parts:
            for k, v in part_sums.items():
                merged[k] += v
        if meter is None:
            return None, merged
        total = GlueMeter(meter.spec.name)
        for part_meter, _ in parts:
            total.merge(part_meter)
        return total, merged


def no_merge(meter: GlueMeter | None, sums: Sums) -> tuple[GlueMeter | None, Sums]:
    return meter, sums
