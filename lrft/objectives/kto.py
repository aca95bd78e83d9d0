"""KTO: single completions labelled desirable or undesirable, against a batch-level KL anchor.

Ethayarajh et al., https://arxiv.org/abs/2402.01306, eq. 8 (the form TRL trains). Per example
with log-ratio r = log π(y|x) − log π_ref(y|x)::

    z₀ = max(0, mean over the step's mismatched rows of log π(y'|x) − log π_ref(y'|x))   (no grad)
    loss = λ_D (1 − σ(β (r − z₀)))   if y is desirable
           λ_U (1 − σ(β (z₀ − r)))   if y is undesirable

averaged over the examples. z₀ estimates KL(π‖π_ref) from mismatched (prompt, completion) rows:
each example's prompt with another example's completion (:mod:`lrft.data.preference`), under
``no_grad`` as in the paper. lrft computes z₀ once over the whole optimizer step (every
micro-batch of every process) before its forwards, so the update does not depend on how the
step is split; TRL's estimate is per micro-batch and per device (then averaged over devices), so
the two agree when a step is one micro-batch on one process (tests/test_trl_parity.py).

Shapes: a micro-batch holds B examples (``input_ids`` (B, T), ``desirable`` (B,)) and their B
mismatched rows (``kl_input_ids`` (B, T')).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrft.methods.layers import adapters_off
from lrft.objectives import register_objective
from lrft.objectives.preference import Context, PreferenceObjective, Reduce, sequence_logps


def _kl_rows(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_ids": batch["kl_input_ids"],
        "attention_mask": batch["kl_attention_mask"],
        "labels": batch["kl_labels"],
    }


@register_objective("kto")
class KTO(PreferenceObjective):
    reference = True
    unpaired = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.desirable_weight = float(cfg.desirable_weight)
        self.undesirable_weight = float(cfg.undesirable_weight)
        self.kl: torch.Tensor | None = None  # z₀ of the current step (set by prepare)

    def denominators(self) -> tuple[str, ...]:
        return ("examples",)

    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]  # torch.full: no host-to-device copy (torch.tensor(list) makes one)
        return torch.full((1,), ids.shape[0], dtype=torch.long, device=ids.device)

    def prepare(
        self, model: nn.Module, window: Sequence[dict[str, Any]], reduce: Reduce, context: Context
    ) -> None:
        device = window[0]["input_ids"].device if window else next(model.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in window:
                rows = _kl_rows(batch)
                with context(batch):
                    policy, _ = sequence_logps(model, rows, self.chunk)
                    if "ref_logps" in batch:  # precomputed (objective.precompute_ref)
                        ref = batch["ref_logps"][:, 1]
                    else:
                        with adapters_off(model):
                            ref, _ = sequence_logps(model, rows, self.chunk)
                total[0] += (policy - ref).double().sum()
                total[1] += len(policy)  # a Python scalar: no host-to-device copy
        total = reduce(total)
        self.kl = (total[0] / total[1].clamp(min=1)).clamp(min=0).float()

    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 2): log π_ref of each example and of its mismatched row (adapters off)."""
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        with torch.no_grad(), adapters_off(model):
            ref, _ = sequence_logps(model, rows, self.chunk)
            kl, _ = sequence_logps(model, _kl_rows(batch), self.chunk)
        return torch.stack([ref, kl], dim=1)

    def loss_terms(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kl is None:
            raise RuntimeError("KTO.prepare must run over the step's micro-batches first")
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        logps, _ = sequence_logps(model, rows, self.chunk)
        if "ref_logps" in batch:
            ref = batch["ref_logps"][:, 0]
        else:
            with torch.no_grad(), adapters_off(model):
                ref, _ = sequence_logps(model, rows, self.chunk)
        good = batch["desirable"].bool()
        ratio = logps - ref
        losses = torch.where(
            good,
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - self.kl))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (self.kl - ratio))),
        )
        rewards, shown = self.beta * ratio.detach(), logps.detach()
        g, b = good.float(), (~good).float()
        metrics = {
            "rewards/chosen": (rewards * g).sum(),
            "rewards/rejected": (rewards * b).sum(),
            "logps/chosen": (shown * g).sum(),
            "logps/rejected": (shown * b).sum(),
            "count/chosen": g.sum(),
            "count/rejected": b.sum(),
            "kl": self.kl * len(good),  # averaged over the examples like the rest: z₀ itself
        }
        return losses.sum().reshape(1).float(), metrics
