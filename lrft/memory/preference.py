"""A preference step as the planner counts it (``objective=dpo|ipo|orpo|simpo``).

A micro-batch of B pairs is 2B rows (the collator's chosen rows, then the rejected ones), each
prompt + completion at most ``dataset.max_length`` tokens. The planner runs the objective's own
``loss_terms`` on meta (:mod:`lrft.objectives.preference`), so it counts what that code allocates,
not a formula of it:

- the training forward keeps the activations of 2B rows; its loss is ``sequence_logps``, which
  materialises the full (2B, T, V) logits and a float32 log-softmax of them (no chunking:
  ``trainer.loss_chunk`` does not apply to this path);
- an objective whose spec has ``reference`` (DPO, IPO) runs a second forward of the same 2B rows
  under ``no_grad`` with the adapters switched off. It keeps nothing for backward, but while it
  runs its working set (one block at a time, then its own logits and float32 log-softmax) sits on
  top of what the training forward still holds: ``PairObjective.logps`` runs it after the
  training forward, before backward. :class:`ReferencePhase` records that moment, so the step's
  peak splits exactly into ``max(training peak, held + reference transient)``.

A reference is the model with its low-rank layers switched off, so it exists only when every
trained parameter lives in one; otherwise lrft train refuses (``check_reference``) and the plan
says what a copy would cost instead of pretending one exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrft.errors import UserError
from lrft.memory.measure import LiveBytes

# where a refused reference points to instead (check_reference's own advice, shortened)
WHAT_WORKS = (
    "a low-rank method (lora_fa, lora, dora, pissa, lora_ga) without modules_to_save, or an "
    "objective without a reference: objective=orpo or objective=simpo"
)


@dataclass
class ReferenceParts:
    """One simulated step's split (bytes beyond weights and optimizer state).

    ``train``: the peak of everything but the reference forward (training forward, loss, backward);
    ``held``: what is alive when the reference forward starts (the training forward's activations,
    its logits' float32 log-softmax kept for backward); ``transient``: the most the reference
    forward adds on top of ``held`` while it runs. The step's peak is ``max(train, held + transient)``.
    """

    train: int = 0
    held: int = 0
    transient: int = 0

    @property
    def peak(self) -> int:
        return max(self.train, self.held + self.transient)


@dataclass
class PairStep:
    """What the planner needs of a preference objective: the objective itself, whether it runs a
    reference forward, and, where that reference would need a copy of the model, why lrft refuses
    it and how large the copy would be (the parameters that train outside the low-rank layers)."""

    name: str
    objective: Any
    reference: bool
    refused: str | None = None
    copy_bytes: int = 0

    rows_per_example: int = 2  # chosen + rejected

    @property
    def note(self) -> str:
        chunk = getattr(self.objective, "chunk", 0)  # lrft versions whose sequence_logps chunks
        logits = (
            "sequence_logps takes the full logits and their float32 log-softmax (unchunked)"
            if chunk == 0
            else f"sequence_logps runs with chunk={chunk}: counted as that code allocates it; the "
            "logits row is one full copy, for scale"
        )
        return (
            f"objective={self.name}: trainer.batch_size counts pairs, 2 rows each (chosen, rejected; "
            f"each prompt + completion <= dataset.max_length); {logits}."
        )


def pair_step(cfg: DictConfig, model: nn.Module) -> PairStep | None:
    """The preference step of ``cfg`` on the (meta) ``model``; None for ``objective=sft``.

    The spec's flags decide (``OBJECTIVES[name].reference``, ``.paired``), not the name, so a new
    pair objective is planned without a change here. One that is not a pair objective (KTO: single
    completions and mismatched KL rows) has a different step, which this module does not count."""
    from lrft.objectives import get_objective, objective_name
    from lrft.objectives.preference import PairObjective, check_reference
    from lrft.objectives.schemas import OBJECTIVES

    name = objective_name(cfg)
    spec = OBJECTIVES[name]
    if spec.module is None:
        return None
    objective = get_objective(cfg)
    if not spec.paired or not isinstance(objective, PairObjective):
        raise UserError(
            f"lrft memory counts the step of pair objectives (chosen + rejected rows), and "
            f"objective={name}'s step is another shape: it is not planned yet. Plan a pair objective "
            "(objective=dpo, ipo, orpo or simpo) at the same batch for an estimate."
        )
    step = PairStep(name, objective, reference=bool(spec.reference))
    if step.reference:
        try:
            check_reference(model)
        except UserError:
            step.refused = "parameters outside the adapters train, so the reference needs a copy"
            step.copy_bytes = sum(
                p.numel() * p.element_size() for p in _outside_adapters(model) if p.requires_grad
            )
    return step


def _outside_adapters(model: nn.Module) -> Iterator[nn.Parameter]:
    from lrft.methods.layers import LowRankLinear

    inside = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    return (p for p in model.parameters() if id(p) not in inside)


def pair_batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    """The collator's batch of ``rows`` full-length rows on meta (chosen rows, then rejected)."""
    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def pair_loss(step: PairStep, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective's loss sums as the training step computes them, summed to one scalar (the
    step scales each sum by a global count: the same graph, the same memory)."""
    terms, _metrics = step.objective.loss_terms(model, batch)
    return terms.sum()


def pair_fields(
    step: PairStep | None,
    parts: dict[tuple[int, Any, bool], ReferenceParts],
    batch_size: int,
    length: int,
    vocab: int,
) -> dict[str, Any]:
    """The :class:`lrft.memory.plan.Plan` fields of a preference step at ``batch_size`` pairs
    (empty for sft); ``parts``: the planner's splits of the simulated peaks (see ``step_peak``)."""
    if step is None:
        return {}
    rows = step.rows_per_example * batch_size
    return {
        "objective": step.name,
        "rows_per_example": step.rows_per_example,
        "logits_f32": logits_f32_bytes(rows, length, vocab),
        "reference": {gc: parts[(batch_size, gc, False)] for gc in (False, True)} if step.reference else None,
        "reference_refused": step.refused,
        "reference_copy": step.copy_bytes,
    }


def logits_f32_bytes(rows: int, length: int, vocab: int) -> int:
    """One float32 (rows, T - 1, V) buffer: what ``sequence_logps`` makes of the logits (the shifted
    logits in float32, and its log-softmax the same size again)."""
    return rows * (length - 1) * vocab * 4


class ReferencePhase:
    """Record the reference forward's share of a :class:`LiveBytes` peak.

    ``PairObjective.logps`` calls ``sequence_logps`` twice: with gradients (training) and, for a
    reference objective, under ``no_grad`` (the reference). While active, the module's
    ``sequence_logps`` is wrapped: a call without gradients is the reference; what is live when it
    starts is ``held``, the most it adds is ``transient``, and it is kept out of ``train``. Like
    :func:`lrft.memory.on_meta.meta_forward`, a module attribute is swapped and restored."""

    def __init__(self, live: LiveBytes) -> None:
        self.live = live
        self.parts = ReferenceParts()

    def _wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def sequence_logps(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return inner(*args, **kwargs)
            live = self.live
            before, start = live.peak, live.current
            live.peak = start
            try:
                return inner(*args, **kwargs)
            finally:
                self.parts.held = max(self.parts.held, start)
                self.parts.transient = max(self.parts.transient, live.peak - start)
                live.peak = before  # the training part's peak goes on without the reference

        return sequence_logps

    def __enter__(self) -> ReferencePhase:
        from lrft.objectives import preference

        self._module, self._inner = preference, preference.sequence_logps
        preference.sequence_logps = self._wrap(self._inner)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._module.sequence_logps = self._inner
        self.parts.train = self.live.peak
