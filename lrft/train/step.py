"""One optimizer step's forward and backward: the loss is token-weighted over the GLOBAL batch.

For a step over micro-batches m (on every rank r) with per-token losses ℓ:

    loss(step) = Σ_r Σ_m Σ_{t ∈ loss tokens} ℓ_t  /  N,   N = number of loss tokens of the step

(for classification and regression a "token" is an example). A per-micro-batch mean, averaged over
micro-batches and ranks, weighs a token of a short batch more than one of a long batch, so the
update would change with how the global batch is split (accumulation, ranks, packing). Here every
rank counts its tokens for the whole window first, one all-reduce gives N, and each micro-batch
backpropagates ``sum · world / N``: DDP's gradient average then yields exactly Σ/N.

Everything stays on the device: no host synchronisation per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrft.data.packing import batch_token_stats
from lrft.methods.dropout_keys import ID_KEY, keyed
from lrft.model.loss import DEFAULT_CHUNK, loss_count, loss_sum
from lrft.train import faults
from lrft.train.sharding import no_sync


@dataclass
class StepResult:
    """Device tensors; nothing here has been synchronised to the host."""

    loss_sum: torch.Tensor  # this rank's summed loss over the window (non-finite included)
    count: torch.Tensor  # this rank's loss tokens
    real_tokens: torch.Tensor  # this rank's non-pad input tokens (throughput)
    padded_tokens: torch.Tensor  # this rank's input positions, pad included
    bad: torch.Tensor  # this rank saw a non-finite loss (0./1.)
    # a preference objective's metric sums over this rank's pairs (``count`` is its pair count)
    metrics: dict[str, torch.Tensor] | None = None


def forward_backward(
    accelerator: Any,
    model: nn.Module,
    window: list[dict[str, Any]],
    task: str,
    *,
    decoder_inputs: Callable | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    step: int = 0,
    loss_chunk: int | str = DEFAULT_CHUNK,
    seed: int = 0,
    objective: Any = None,
) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step (gradients accumulate).

    Backward always runs, also on a batch whose loss is not finite (it contributes zero): every
    rank then joins every gradient all-reduce, and the step policy decides for all ranks at once.
    The dropout masks of a micro-batch are keyed by its examples' ids, ``step`` and ``seed``
    (:mod:`lrft.methods.dropout_keys`), for its forward and its backward.
    """
    if objective is not None:
        objective.chunk = loss_chunk
        return _pairs_forward_backward(
            accelerator, model, window, objective, autocast=autocast, step=step, seed=seed
        )
    device = accelerator.device
    world = accelerator.num_processes
    count = torch.stack([loss_count(b, task) for b in window]).sum().to(device)
    total = accelerator.reduce(count.clone(), "sum") if world > 1 else count
    scale = world / total.clamp(min=1).float()
    acc = torch.zeros((), dtype=torch.float32, device=device)
    bad = torch.zeros((), dtype=torch.float32, device=device)
    real = torch.zeros((), dtype=torch.long, device=device)
    padded = torch.zeros((), dtype=torch.long, device=device)
    nan_fault = faults.armed("nan_loss_at_step", step + 1, accelerator.process_index)
    for i, batch in enumerate(window):
        # gradients are all-reduced once per step, on the last micro-batch
        sync = nullcontext() if i == len(window) - 1 else no_sync(accelerator, model)
        batch = dict(batch)
        ids = batch.pop(ID_KEY, None)
        positions = batch.get("position_ids") if ids is not None and ids.dim() == 2 else None
        with sync, keyed(ids, positions, seed, step):
            with autocast():
                s = loss_sum(model, batch, task, decoder_inputs, loss_chunk, upstream=scale)
            if nan_fault:
                s = s * float("nan")
            finite = torch.isfinite(s)
            bad = torch.maximum(bad, (~finite).float())
            accelerator.backward(torch.where(finite, s, torch.zeros_like(s)) * scale)
        acc += s.detach()
        tokens, _pad = batch_token_stats(batch)  # packed rows have no attention mask
        real += tokens
        padded += batch["input_ids"].numel()
    if faults.armed("grad_inf_at_step", step + 1, accelerator.process_index):
        p = next(p for p in model.parameters() if p.grad is not None)
        p.grad.view(-1)[0] = float("inf")
    return StepResult(acc, count, real, padded, bad)


def _pairs_forward_backward(
    accelerator: Any,
    model: nn.Module,
    window: list[dict[str, Any]],
    objective: Any,
    *,
    autocast: Callable[[], AbstractContextManager],
    step: int,
    seed: int,
) -> StepResult:
    """:func:`forward_backward` for a preference objective (:mod:`lrft.objectives.preference`).

    The objective returns K loss sums per micro-batch, each averaged over its own global count
    (pairs; chosen tokens for ORPO's NLL): ``loss = Σ_k S_k / N_k`` with S_k and N_k over every
    micro-batch of every rank, so the update is the same however the pairs are split. The logged
    ``loss_sum`` is ``Σ_k s_k · N_0 / N_k`` over ``count = n_0`` (this rank's pairs): summed over
    ranks and divided by the pairs it gives the step's loss."""
    device = accelerator.device
    world = accelerator.num_processes
    counts = torch.stack([objective.counts(b) for b in window]).sum(0).to(device)
    total = accelerator.reduce(counts.clone(), "sum") if world > 1 else counts
    weights = total[0].float() / total.clamp(min=1).float()  # N_0 / N_k, for the logged loss
    scale = world / total.clamp(min=1).float()
    acc = torch.zeros((), dtype=torch.float32, device=device)
    bad = torch.zeros((), dtype=torch.float32, device=device)
    real = torch.zeros((), dtype=torch.long, device=device)
    padded = torch.zeros((), dtype=torch.long, device=device)
    metrics: dict[str, torch.Tensor] = {}

    def key(batch: dict[str, Any]) -> AbstractContextManager:
        return keyed(batch.get(ID_KEY), None, seed, step)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(x, "sum") if world > 1 else x

    with autocast():  # a statistic of the whole step first (KTO's KL estimate), without gradients
        objective.prepare(model, window, reduce, key)
    for i, batch in enumerate(window):
        sync = nullcontext() if i == len(window) - 1 else no_sync(accelerator, model)
        batch = dict(batch)
        ids = batch.pop(ID_KEY, None)
        with sync, keyed(ids, None, seed, step):
            with autocast():
                terms, got = objective.loss_terms(model, batch)
            finite = torch.isfinite(terms).all()
            bad = torch.maximum(bad, (~finite).float())
            loss = (torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)) * scale).sum()
            accelerator.backward(loss)
        acc += (terms.detach() * weights).sum()
        for key, value in got.items():
            metrics[key] = metrics.get(key, 0) + value.detach().float()
        tokens, _pad = batch_token_stats(batch)
        real += tokens
        padded += batch["input_ids"].numel()
    return StepResult(acc, counts[0], real, padded, bad, metrics)
