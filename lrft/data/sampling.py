"""Length-grouped sampling (``trainer.group_by_length=true``): batches of similar lengths.

A random batch of long-tailed instruction data pads to its longest row, so most of its compute is
spent on padding. Grouping by length keeps each batch's rows close in length while the order of
the data stays random:

1. a seeded permutation of the examples for the epoch;
2. cut into megabatches of ``mega × batch_size`` examples, each sorted by length, longest first,
   and cut into batches (neighbours in length share a batch);
3. the full batches shuffled with the same epoch seed, the one with the epoch's longest example
   moved to the front (a batch that does not fit in memory fails at step 1, not hours in), a
   partial batch (``n % batch_size`` rows) kept last.

The sampler yields example indices; a ``DataLoader`` with the same ``batch_size`` and
``drop_last=False`` cuts them into exactly those batches. Like the loop's ``EpochSampler`` the
order depends only on (seed, epoch): resume calls :meth:`LengthGroupedSampler.use_epoch` and skips
the batches already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lrft.errors import UserError


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Indices in length-grouped batches, a pure function of (lengths, batch_size, seed, epoch).

    Args:
        lengths: tokens of each example (``len(example["input_ids"])``).
        batch_size: the loader's per-process batch size.
        seed: the run's seed (``trainer.seed``).
        mega: batches per megabatch; larger groups lengths more tightly but makes the order of
            examples less random (HF's ``LengthGroupedSampler`` uses 50).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> None:
        if batch_size < 1 or mega < 1:
            raise UserError(f"group_by_length needs batch_size >= 1 and mega >= 1, got {batch_size}, {mega}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.seed, self.mega, self.epoch = batch_size, seed, mega, 0

    def use_epoch(self, epoch: int) -> None:
        """Named as ``EpochSampler``'s, not ``set_epoch`` (accelerate calls that with its own count)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order (what the loader will yield)."""
        n, bs = len(self.lengths), self.batch_size
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=gen)
        size = self.mega * bs
        full: list[list[int]] = []
        partial: list[int] = []
        for start in range(0, n, size):
            group = perm[start : start + size]
            # stable sort on (length desc) keeps the permutation's order among equal lengths
            order = torch.sort(self.lengths[group], descending=True, stable=True).indices
            group = group[order].tolist()
            for b in range(0, len(group), bs):
                chunk = group[b : b + bs]
                if len(chunk) == bs:
                    full.append(chunk)
                else:  # only the last megabatch can leave one, n % bs rows
                    partial = chunk
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        if shuffled:
            first = max(range(len(shuffled)), key=lambda i: int(self.lengths[shuffled[i][0]]))
            shuffled.insert(0, shuffled.pop(first))
        return shuffled + ([partial] if partial else [])

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        return len(self.lengths)
