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
) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step (gradients accumulate).

    Backward always runs, also on a batch whose loss is not finite (it contributes zero): every
    rank then joins every gradient all-reduce, and the step policy decides for all ranks at once.
    The dropout masks of a micro-batch are keyed by its examples' ids, ``step`` and ``seed``
    (:mod:`lrft.methods.dropout_keys`), for its forward and its backward.
    """
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
