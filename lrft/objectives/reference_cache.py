"""``objective.precompute_ref=true``: the reference log-probs of every training example, computed
once before the first step and kept with the run, so a step is one forward per sequence.

DPO, IPO and KTO compare the policy with π_ref, the model with its adapters switched off
(:func:`~lrft.methods.layers.adapters_off`). Without the cache each step runs that reference
forward again (no gradient, but a forward's time and its logits' transient memory). With it, one
pass over the training set (eval mode, ``no_grad``, adapters off) fills a table

    T[e] = (log π_ref(y_w|x), log π_ref(y_l|x))      pairs
    T[e] = (log π_ref(y|x),   log π_ref(y'|x))       KTO: the example and its mismatched row

(float32, (N, 2), indexed by the example's position in the training data), written to
``RUN/ref_logps.safetensors``; a resumed run reads it back. The examples then carry their row
(:class:`WithReference`, ``ref_logps`` in the batch) and the objectives use it instead of the
forward. Processes split the pass (example e on rank e mod W, in lockstep: a sharded model's
forward is a collective) and sum their tables.

Eval mode: the reference is the model without dropout, the same on every pass; the base models
lrft trains have no dropout of their own outside the low-rank layers (LLaMA-family attention
dropout 0), where precomputed and per-step references are equal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrft.methods.layers import adapters_off

FILE = "ref_logps.safetensors"
BATCH = 8  # examples per reference forward


class WithReference(Sequence):
    """Training examples that carry their precomputed reference log-probs as ``ref_logps``."""

    def __init__(self, rows: Any, table: torch.Tensor) -> None:
        self.rows, self.table = rows, table.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, ex in enumerate(self.rows):
            yield {**ex, "ref_logps": self.table[i]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], "ref_logps": self.table[int(index)]}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        many = getattr(self.rows, "__getitems__", None)
        got = many(list(indices)) if many is not None else [self.rows[i] for i in indices]
        return [{**ex, "ref_logps": self.table[int(i)]} for ex, i in zip(got, indices, strict=True)]


def _saved(path: Path, n: int, name: str) -> torch.Tensor | None:
    """The run's table, if it is this data's and this objective kind's (a resume)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            table = fh.get_tensor("ref_logps")
    except Exception:  # a damaged file is recomputed, not trusted
        return None
    if meta.get("kind") != name or table.shape != (n, 2):
        return None
    return table


def reference_table(
    model: nn.Module, objective: Any, rows: Any, collate: Any, accelerator: Any, run_dir: Path
) -> torch.Tensor:
    """(N, 2) reference log-probs of ``rows`` (see the module docstring), computed or read back."""
    from safetensors.torch import save_file

    kind = "unpaired" if objective.unpaired else "pairs"
    path = run_dir / FILE
    n = len(rows)
    table = _saved(path, n, kind)
    if table is not None:
        return table
    device = next(model.parameters()).device
    table = torch.zeros(n, 2, dtype=torch.float32, device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    # every rank runs the same number of forwards (a sharded model's forward is a collective): a
    # rank with fewer examples runs filler batches and keeps nothing of them
    passes = math.ceil(math.ceil(n / world) / BATCH)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapters_off(model):
            for k in range(passes):
                index = mine[k * BATCH : (k + 1) * BATCH]
                batch = collate([rows[i] for i in index or mine[:1] or [0]])
                batch = {k_: v.to(device) for k_, v in batch.items() if isinstance(v, torch.Tensor)}
                got = objective.reference_logps(model, batch)
                if index:  # else a filler: its forwards only keep the ranks in step
                    table[torch.tensor(index, device=device)] = got.float()
    finally:
        model.train(was_training)
    if world > 1:
        table = accelerator.reduce(table, "sum")
    table = table.cpu()
    if accelerator.is_main_process:
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        save_file({"ref_logps": table.contiguous()}, str(tmp), metadata={"kind": kind})
        os.replace(tmp, path)
    return table
