"""Preference metrics on held-out pairs: the objective's loss and TRL's reward statistics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def preference_metrics(
    model: nn.Module, batches: Iterable[tuple[dict[str, Any], Any]], objective: Any, merge: Any = None
) -> dict[str, float]:
    """``loss`` (each term averaged over its count, as in training) and ``rewards/*``,
    ``logps/*`` averaged over the pairs; ``merge`` combines every process's sums."""
    sums: dict[str, float] = {}
    for batch, _ in batches:
        batch.pop("dropout_ids", None)
        with torch.no_grad():
            terms, metrics = objective.loss_terms(model, batch)
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
    pairs = max(sums.get("count0", 0.0), 1.0)
    out = {"loss": loss if k else float("nan")}
    out.update({key: v / pairs for key, v in sums.items() if "/" in key})
    return out
