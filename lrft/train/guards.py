"""Guards against silent failure: gradients that never arrive, non-finite losses, adapters that
never move."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from lrft.errors import UserError


def check_gradients(model: nn.Module, allow_nonfinite: bool = False) -> None:
    """After the first backward: every trainable parameter has a finite gradient, else stop.

    The classic failure is gradient checkpointing (reentrant) over frozen embeddings: the adapters
    receive no gradient and the run "trains" for days without learning anything. Under fp16,
    ``allow_nonfinite``: an overflow is the GradScaler's routine (it skips the step and lowers its
    scale), not a reason to stop.
    """
    missing, bad = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not allow_nonfinite and not torch.isfinite(_whole(p.grad)).all():
            bad.append(name)
    if missing:
        raise UserError(
            f"{len(missing)} trainable parameters received no gradient in the first step, e.g. "
            f"{', '.join(missing[:6])}. They would never train. Common causes: reentrant gradient "
            "checkpointing over frozen inputs, a target module the forward never uses, or a head that "
            "is not part of the loss."
        )
    if bad:
        raise UserError(
            f"non-finite gradients in the first step for {', '.join(bad[:6])}: lower optimizer.lr, "
            "use trainer.mixed_precision=bf16 instead of fp16, or check the data."
        )


def _whole(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are dim-0 shards: every rank must judge the whole one (this is a collective,
    # and every rank walks the same parameters in the same order)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nan_message(step: int, loss: float, last_ckpt: str | None) -> str:
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (
        f"loss is {loss} at step {step}: stopping without saving (NaN weights never overwrite a good "
        f"checkpoint; {where}). Lower optimizer.lr, keep trainer.max_grad_norm > 0, or set "
        "trainer.on_nan=skip to skip such steps."
    )


class UntrainedWatch:
    """Warns when parameters that start at exactly zero (LoRA's B) are still zero after N steps."""

    def __init__(self, model: nn.Module, after_steps: int) -> None:
        self.after = after_steps
        self.zero = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not p.any()]

    def check(self, step: int) -> None:
        if not self.zero or step != self.after:
            return
        still = [n for n, p in self.zero if not p.any()]
        if still:
            warnings.warn(
                f"{len(still)} of {len(self.zero)} zero-initialised trainable tensors are still exactly "
                f"zero after {step} steps (e.g. {still[0]}): the adapter is not learning. Check "
                "optimizer.lr, the gradient flow and trainer.on_nan skips.",
                stacklevel=2,
            )


def finite(x: float) -> bool:
    return math.isfinite(x)
