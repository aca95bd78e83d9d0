"""A preference step as the planner counts it (``objective=dpo|ipo|orpo|simpo|kto``).

The planner runs the objective's own ``prepare`` and ``loss_terms`` on meta
(:mod:`lrft.objectives.preference`), so it counts what that code allocates, not a formula of it.
Two batch shapes exist, told apart by the objective's ``unpaired`` flag, not by its name:

- pairs (DPO, IPO, ORPO, SimPO): a micro-batch of B pairs is 2B rows (the collator's chosen rows,
  then the rejected ones), each prompt + completion at most ``dataset.max_length`` tokens;
- single completions (KTO): B rows labelled good or bad, plus B mismatched KL rows (each
  prompt with another row's completion) that only ``prepare`` scores.

Every row's log-prob is ``sequence_logps``, which projects ``trainer.loss_chunk`` positions of
logits at a time (``auto``: at most 2^26 logits a chunk), each chunk under checkpoint: forward
keeps a chunk's per-position log-probs, not its logits, and backward recomputes one chunk's logits
at a time. Only ``loss_chunk=0`` (or a head that cannot be chunked) takes the whole logits. The
planner sets ``objective.chunk`` from the config, as the training step does.

Three phases of a step, each recorded by :class:`ReferencePhase` so the peak splits exactly:

- ``prepare`` (KTO): before any training forward, no-grad policy and adapters-off reference
  forwards of every micro-batch's KL rows. It keeps nothing, so its peak is its own transient;
- the training forward, loss and backward;
- an objective whose spec has ``reference`` (DPO, IPO, KTO) runs a second forward of its training
  rows under ``no_grad`` with the adapters switched off, after the training forward and before
  backward: its working set (one block at a time, one chunk of logits) sits on top of what the
  training forward still holds.

So ``step peak = max(prepare peak, training peak, held + reference transient)``.

A reference is the model with its low-rank layers switched off, so it exists only when every
trained parameter lives in one; otherwise lrft train refuses (``check_reference``) and the plan
says what a copy would cost instead of pretending one exists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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

    ``train``: the peak of the training forward, loss and backward; ``held``: what is alive when
    the reference forward starts (the training forward's activations and per-position log-probs);
    ``transient``: the most the reference forward adds on top of ``held`` while it runs;
    ``prepare``: the peak of the no-grad pass before the training forward (KTO's KL rows; 0 for
    pair objectives, whose ``prepare`` does nothing)."""

    train: int = 0
    held: int = 0
    transient: int = 0
    prepare: int = 0

    @property
    def peak(self) -> int:
        return max(self.train, self.held + self.transient, self.prepare)


@dataclass
class PreferenceStep:
    """What the planner needs of a preference objective: the objective itself, its batch shape
    (training rows per example, KL rows per example), whether it runs a reference forward, and,
    where that reference would need a copy of the model, why lrft refuses it and how large the copy
    would be (the parameters that train outside the low-rank layers)."""

    name: str
    objective: Any
    reference: bool
    rows_per_example: int = 2  # training rows: chosen + rejected, or 1 (a labelled completion)
    kl_rows: int = 0  # mismatched rows per example scored by ``prepare`` (KTO)
    refused: str | None = None
    copy_bytes: int = 0
    precomputed: bool = False  # objective.precompute_ref: the batch carries π_ref, no reference forward

    @property
    def unit(self) -> str:
        """What ``trainer.batch_size`` counts."""
        return "pairs" if self.rows_per_example == 2 else "examples"

    @property
    def note(self) -> str:
        chunk = self.objective.chunk
        logits = (
            "sequence_logps takes the whole logits (trainer.loss_chunk=0)"
            if chunk == 0
            else f"sequence_logps projects trainer.loss_chunk={chunk} positions of logits at a time, "
            "each chunk checkpointed (backward recomputes one chunk's logits)"
        )
        if self.kl_rows:
            shape = (
                f"trainer.batch_size counts examples (labelled completions), each 1 row plus "
                f"{self.kl_rows} mismatched KL row, scored with no grad by policy and reference "
                "before the training forward"
            )
        else:
            shape = "trainer.batch_size counts pairs, 2 rows each (chosen, rejected)"
        ref = "; reference log-probs precomputed (no reference forward)" if self.precomputed else ""
        return f"objective={self.name}: {shape}; each row <= dataset.max_length; {logits}{ref}."


def pair_step(cfg: DictConfig, model: nn.Module) -> PreferenceStep | None:
    """The preference step of ``cfg`` on the (meta) ``model``; None for ``objective=sft``.

    Flags decide, not the name: the spec's ``reference`` (a reference forward) and the objective's
    ``unpaired`` (single completions with KL rows, else chosen/rejected pairs), so a new objective
    of either shape is planned without a change here. ``objective.chunk`` is the config's
    ``trainer.loss_chunk``, as :func:`lrft.train.step.forward_backward` sets it."""
    from lrft.model.loss import DEFAULT_CHUNK
    from lrft.objectives import get_objective, objective_name
    from lrft.objectives.preference import PairObjective, check_reference
    from lrft.objectives.schemas import OBJECTIVES

    name = objective_name(cfg)
    spec = OBJECTIVES[name]
    if spec.module is None:
        return None
    objective = get_objective(cfg)
    objective.chunk = cfg.trainer.get("loss_chunk", DEFAULT_CHUNK)
    if getattr(objective, "unpaired", False):
        step = PreferenceStep(name, objective, bool(spec.reference), rows_per_example=1, kl_rows=1)
    elif isinstance(objective, PairObjective):
        step = PreferenceStep(name, objective, bool(spec.reference))
    else:
        raise UserError(
            f"lrft memory counts pair objectives (chosen + rejected rows) and labelled single "
            f"completions (with KL rows), and objective={name}'s step is neither: it is not planned "
            "yet. Plan objective=dpo or objective=kto at the same batch for an estimate."
        )
    if getattr(objective.cfg, "precompute_ref", False):  # the table replaces the step's forward
        step.reference, step.precomputed = False, True
    if spec.reference:
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


def _rows(rows: int, length: int) -> torch.Tensor:
    return torch.zeros(rows, length, dtype=torch.long, device="meta")


def pair_batch(step: PreferenceStep, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """The collator's batch of ``batch_size`` examples on meta, every row full length: 2B rows of
    pairs (chosen, then rejected), or B labelled rows and their B KL rows."""
    ids = _rows(step.rows_per_example * batch_size, length)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if step.kl_rows:
        kl = _rows(step.kl_rows * batch_size, length)
        batch.update(kl_input_ids=kl, kl_attention_mask=torch.ones_like(kl), kl_labels=kl)
        batch["desirable"] = torch.zeros(batch_size, dtype=torch.long, device="meta")
    if step.precomputed:  # (B, 2) float32 per example, as the collator adds it
        batch["ref_logps"] = torch.zeros(batch_size, 2, device="meta")
    return batch


def run_prepare(objective: Any, model: nn.Module, batch: dict[str, Any]) -> None:
    """The step's ``prepare`` on one micro-batch's window, on one process (no reduction, no dropout
    keys). Each micro-batch of a real window runs alone and keeps nothing, so one has its peak."""
    objective.prepare(model, [batch], lambda x: x, lambda _b: nullcontext())


def pair_loss(
    step: PreferenceStep, model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | str | None = None
) -> torch.Tensor:
    """The step as it runs: ``prepare``, then the objective's loss sums, summed to one scalar (the
    step scales each sum by a global count: the same graph, the same memory). ``chunk``: another
    ``trainer.loss_chunk`` than the config's (the full-logits row)."""
    with _chunk(step.objective, chunk):
        run_prepare(step.objective, model, batch)
        terms, _metrics = step.objective.loss_terms(model, batch)
    return terms.sum()


@contextmanager
def _chunk(objective: Any, chunk: int | str | None) -> Iterator[None]:
    saved = objective.chunk
    objective.chunk = saved if chunk is None else chunk
    try:
        yield
    finally:
        objective.chunk = saved


def pair_fields(
    step: PreferenceStep | None,
    parts: dict[tuple[int, Any, bool], ReferenceParts],
    batch_size: int,
    length: int,
    model: nn.Module,
) -> dict[str, Any]:
    """The :class:`lrft.memory.plan.Plan` fields of a preference step at ``batch_size`` examples
    (empty for sft); ``parts``: the planner's splits of the simulated peaks (see ``step_peak``)."""
    if step is None:
        return {}
    rows = step.rows_per_example * batch_size
    positions = logits_positions(model, step.objective.chunk, rows, length)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    phases = step.reference or step.kl_rows  # a split worth showing: a reference or a prepare pass
    return {
        "objective": step.name,
        "rows_per_example": step.rows_per_example,
        "kl_rows": step.kl_rows,
        "logits_positions": positions,
        "logits_f32": positions * vocab * 4,
        "reference": {gc: parts[(batch_size, gc, False)] for gc in (False, True)} if phases else None,
        "reference_refused": step.refused,
        "reference_copy": step.copy_bytes,
    }


def logits_positions(model: nn.Module, chunk: int | str, rows: int, length: int) -> int:
    """How many positions of logits ``sequence_logps`` holds at once: one chunk (at most every
    position of the ``rows``), or all of them with ``loss_chunk=0`` or a head that cannot be
    chunked (:func:`lrft.model.loss.chunkable_head`)."""
    from lrft.model.loss import chunk_positions, chunkable_head

    everything = rows * length
    head = chunkable_head(model) if chunk != 0 else None
    if head is None:
        return everything
    return min(everything, chunk_positions(chunk, head.weight.shape[0]))


class ReferencePhase:
    """Record a step's phases in a :class:`LiveBytes` peak (:class:`ReferenceParts`).

    ``sequence_logps`` without gradients is a reference forward: while active, every loaded
    ``lrft.objectives`` module's ``sequence_logps`` (each objective module imports it by name) is
    wrapped; what is live when it starts is ``held``, the most it adds is ``transient``, and it is
    kept out of ``train``. ``objective``'s ``prepare`` (an instance attribute shadowing the
    method) is bracketed too: its peak is ``prepare``, its no-grad forwards are not the reference.
    Like :func:`lrft.memory.on_meta.meta_forward`, attributes are swapped and restored."""

    def __init__(self, live: LiveBytes, objective: Any = None) -> None:
        self.live = live
        self.objective = objective
        self.parts = ReferenceParts()
        self._preparing = False
        self._patched: list[tuple[Any, Any]] = []

    def _wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def sequence_logps(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() or self._preparing:
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

    def _wrap_prepare(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def prepare(*args: Any, **kwargs: Any) -> Any:
            live = self.live
            before, live.peak = live.peak, live.current
            self._preparing = True
            try:
                return inner(*args, **kwargs)
            finally:
                self._preparing = False
                self.parts.prepare = max(self.parts.prepare, live.peak)
                live.peak = before

        return prepare

    def __enter__(self) -> ReferencePhase:
        from lrft.objectives import preference

        inner = preference.sequence_logps
        wrapped = self._wrap(inner)
        for name, module in list(sys.modules.items()):
            if name.startswith("lrft.objectives") and getattr(module, "sequence_logps", None) is inner:
                self._patched.append((module, inner))
                module.sequence_logps = wrapped
        if self.objective is not None:
            self.objective.prepare = self._wrap_prepare(self.objective.prepare)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, inner in self._patched:
            module.sequence_logps = inner
        self._patched.clear()
        if self.objective is not None:
            del self.objective.prepare  # the class's method again
        self.parts.train = self.live.peak
