"""The step policy: whether a step's accumulated gradients become an update, decided the same way
on every rank.

- A non-finite loss on any rank sets one flag, all-reduced (max) once per optimizer step, so all
  ranks skip or stop together (a per-rank decision leaves DDP collectives unmatched or lets the
  ranks' weights diverge).
- fp16 overflow is the GradScaler's business: it skips the update and lowers its scale; those
  steps are counted, not treated as NaN failures.
- Guards read unscaled gradients (the first step's gradient check, clipping).
- ``trainer.on_nan`` acts on real non-finite losses (and non-finite gradient norms without fp16).

One host synchronisation per optimizer step: the decision itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.train.guards import check_gradients, nan_message
from lrft.train.sharding import whole
from lrft.train.state import TrainState
from lrft.train.step import StepResult


class StepPolicy:
    """Owns precision details (autocast, the fp16 GradScaler) and the per-step decision."""

    def __init__(
        self, accelerator: Any, tcfg: Any, updates_in_backward: bool = False, sharded: bool = False
    ) -> None:
        self.acc = accelerator
        self.t = tcfg
        self.in_backward = updates_in_backward  # layer-wise GaLore: nothing left to clip or check
        self.fp16 = accelerator.mixed_precision == "fp16"
        # on CPU accelerate does not autocast fp16 itself (its GradScaler is set in make_engine)
        self._cpu_autocast = self.fp16 and accelerator.device.type == "cpu"
        # a model lrft sharded itself never went through accelerate's prepare, which autocasts
        self._own_autocast = sharded and accelerator.mixed_precision != "no"

    def autocast(self) -> AbstractContextManager:
        if self._cpu_autocast:
            return torch.autocast(self.acc.device.type, dtype=torch.float16)
        if self._own_autocast:
            return self.acc.autocast()
        return nullcontext()  # accelerate wraps the prepared model's forward itself

    @property
    def scale(self) -> float | None:
        return self.acc.scaler.get_scale() if self.acc.scaler is not None else None

    def update(self, model: nn.Module, optimizer: Any, scheduler: Any, res: StepResult, state: TrainState):
        """The optimizer update of one window: clip, check, then ``optimizer.step()`` or skip it,
        the same outcome on every rank; then zero the gradients and step the scheduler."""
        bad = res.bad
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad.clone(), "sum")
        norm = None
        if not self.in_backward:
            if self.t.max_grad_norm > 0:
                norm = self.acc.clip_grad_norm_(model.parameters(), self.t.max_grad_norm)  # unscales
            elif self.acc.scaler is not None:
                self.acc.unscale_gradients()
        norm_bad = torch.zeros((), device=bad.device)
        if norm is not None and not self.fp16:  # fp16: an overflow is the scaler's to handle
            norm = whole(torch.as_tensor(norm))  # FSDP2: a replicated DTensor
            norm_bad = (~torch.isfinite(norm.to(bad.device))).float()
        any_bad, any_norm_bad = torch.stack([bad, norm_bad]).tolist()  # the one host sync
        step = state.pos.step + 1
        if step == 1 and not self.in_backward and not any_bad:
            check_gradients(self.acc.unwrap_model(model), allow_nonfinite=self.fp16)
        if any_bad or any_norm_bad:
            if self.t.on_nan == "stop":
                # every rank is here together: the loss of the whole step, the same message on all
                stats = torch.stack([res.loss_sum, res.count.float()])
                if self.acc.num_processes > 1:
                    stats = self.acc.reduce(stats, "sum")
                loss = stats[0].item() / max(1.0, stats[1].item())
                raise UserError(nan_message(step, loss, state.last_ckpt))
            state.skipped += 1
            if self.acc.scaler is not None:
                self.acc.scaler.update()  # the scaler must close this step, or the next unscale fails
        else:
            optimizer.step()
            if getattr(optimizer, "step_was_skipped", False):
                state.overflow += 1  # GradScaler found inf/NaN gradients: it lowered its scale
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
