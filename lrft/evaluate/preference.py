"""Preference metrics on held-out pairs: the objective's loss and TRL's reward statistics."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lrft.evaluate.shard import FILLER


def preference_metrics(
    model: nn.Module, batches: Iterable[tuple[dict[str, Any], Any]], objective: Any, merge: Any = None
) -> dict[str, float]:
    """``loss`` (each term averaged over its count, as in training) and ``rewards/*``,
    ``logps/*`` averaged over the pairs (KTO: over its good / bad examples); ``merge`` combines
    every process's sums.

    Lockstep fillers (a sharded model: :data:`~lrft.evaluate.shard.FILLER`) run every forward a
    real batch runs, so each rank joins as many of FSDP2's all-gathers as the others, but add to no
    sum: an objective counts pairs (examples), not label tokens, so a label-free batch would count."""
    from lrft.objectives.preference import average_metrics

    real: list[dict[str, Any]] = []
    fillers: list[dict[str, Any]] = []
    for batch, refs in batches:  # held-out sets are small; KTO reads them twice
        batch.pop("dropout_ids", None)
        (fillers if refs is FILLER else real).append(batch)

    def no_key(_batch: dict[str, Any]) -> Any:
        return nullcontext()

    if real or fillers or merge is not None:  # every process joins the reduction, also with no batch

        def reduce(x: torch.Tensor) -> torch.Tensor:
            if merge is None:
                return x
            _, total = merge(None, {str(i): v for i, v in enumerate(x.tolist())})
            return torch.tensor([total[str(i)] for i in range(len(x))], dtype=x.dtype, device=x.device)

        if fillers:
            # the fillers' share of a whole-set statistic (KTO's KL forwards) first, reduced nowhere:
            # the real prepare below overwrites what it sets, and every rank has then run
            # ceil(batches / W) batches' forwards before the one collective ``reduce`` (gather_object)
            objective.prepare(model, fillers, lambda x: x, no_key)
        objective.prepare(model, real, reduce, no_key)
    sums: dict[str, float] = {}
    for batch, scored in [(b, True) for b in real] + [(b, False) for b in fillers]:
        with torch.no_grad():
            terms, metrics = objective.loss_terms(model, batch)
        if not scored:  # its forwards ran, in step with the other ranks; it adds to no sum
            continue
        counts = objective.counts(batch)
        for k, (term, count) in enumerate(zip(terms.tolist(), counts.tolist(), strict=True)):
            sums[f"term{k}"] = sums.get(f"term{k}", 0.0) + term
            sums[f"count{k}"] = sums.get(f"count{k}", 0.0) + count
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    if merge is not None:
        _, sums = merge(None, sums)
    k = 0
    loss = 0.0
    while f"term{k}" in sums:
        loss += sums[f"term{k}"] / max(sums[f"count{k}"], 1.0)
        k += 1
    out = {"loss": loss if k else float("nan")}
    out.update(average_metrics(sums, max(sums.get("count0", 0.0), 1.0)))
    return out
