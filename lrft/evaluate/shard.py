"""Evaluation split across processes: each rank scores every W-th batch, then the tallies merge.

Batches are formed exactly as in one process and only dealt out, so every number a batch
produces is the one a single process computes; merging adds sums (float64) and confusion
matrices (exact), and concatenates STS-B's scores (Spearman and Pearson do not depend on order).

``lockstep`` (a sharded model, FSDP2: every forward is a collective, so every rank must run the
same number of them): ranks left with one batch fewer run one more whose labels are all ignored
(-100). A token loss counts no token of it, so the merged sums are those of the whole set.
Preference objectives count pairs (or examples), not label tokens, so such a batch would count:
it comes marked (:data:`FILLER` in place of its reference labels) and preference metrics run its
forwards without adding it to any sum (:func:`lrft.evaluate.preference.preference_metrics`).
"""

from __future__ import annotations

from typing import Any

from lrft.evaluate.metrics import GlueMeter

Sums = dict[str, float]

# the second item of a lockstep filler batch (where a real batch has its reference labels or None)
FILLER = "lockstep-filler"


class Shard:
    """Which batches this process evaluates, and how all processes' tallies combine."""

    def __init__(self, accelerator: Any = None, lockstep: bool = False) -> None:
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.lockstep = lockstep and self.world > 1

    def mine(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def fillers(self, n_batches: int) -> int:
        """How many label-free batches this rank adds so all ranks run ceil(n / W) forwards."""
        if not self.lockstep:
            return 0
        mine = len(range(self.rank, n_batches, self.world))
        return -(-n_batches // self.world) - mine

    def merge(self, meter: GlueMeter | None, sums: Sums) -> tuple[GlueMeter | None, Sums]:
        """Every rank's meter and sums, combined (a collective: every rank calls it)."""
        if self.world == 1:
            return meter, sums
        from accelerate.utils import gather_object

        parts = gather_object([(meter, sums)])
        # the union of the keys: a rank that scored no batch (fewer batches than ranks, or only
        # fillers) has no preference metric sums at all, and the others' must still add up
        merged: Sums = {k: 0.0 for k in sums}
        for _, part_sums in parts:
            for k, v in part_sums.items():
                merged[k] = merged.get(k, 0.0) + v
        if meter is None:
            return None, merged
        total = GlueMeter(meter.spec.name)
        for part_meter, _ in parts:
            total.merge(part_meter)
        return total, merged


def no_merge(meter: GlueMeter | None, sums: Sums) -> tuple[GlueMeter | None, Sums]:
    return meter, sums
