"""Optimizers by config name, over the parameter groups a method hands out.

The optimizer knows nothing of methods: a group that carries ``rank`` (GaLore's projection
settings, see :meth:`lrft.methods.galore.Galore.param_groups`) makes AdamW run as GaLore-AdamW.

Besides torch's AdamW and SGD: bitsandbytes' 8-bit AdamW, and GaLore (arXiv 2403.03507), Adam
whose moments live in a rank-r projection of each 2-D gradient (:class:`GaLoreAdamW`), optionally
with 8-bit moments and optionally applied layer by layer inside the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from lrft.errors import UserError, did_you_mean
from lrft.schema import GALORE_OPTIMIZER, OPTIMIZERS


def build_optimizer(
    groups: list[dict[str, Any]], ocfg: Any, in_backward: bool = False
) -> torch.optim.Optimizer:
    """``optimizer.name`` over parameter ``groups`` (each may carry its own weight_decay).

    Groups that carry ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type`` are projected
    (see :class:`GaLoreAdamW`): their presence turns adamw / adamw8bit into its GaLore form, whose
    other groups get plain Adam. ``in_backward``: GaLore's layer-wise mode, each parameter updated
    inside its gradient hook.
    """
    groups = [g for g in groups if g["params"]]
    name = ocfg.name
    if any("rank" in g for g in groups) or in_backward:
        if name not in GALORE_OPTIMIZER:
            raise UserError(
                f"optimizer={name} has no GaLore form (projected parameter groups); use one of "
                f"{', '.join(sorted(set(GALORE_OPTIMIZER)))}."
            )
        name = GALORE_OPTIMIZER[name]
    betas = tuple(ocfg.betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=ocfg.lr, betas=betas, eps=ocfg.eps)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            groups, lr=ocfg.lr, betas=betas, eps=ocfg.eps, weight_decay=ocfg.weight_decay
        )
    if name in GALORE_OPTIMIZER.values():
        return GaLoreAdamW(
            groups,
            lr=ocfg.lr,
            betas=betas,
            eps=ocfg.eps,
            weight_decay=ocfg.weight_decay,
            eight_bit=name == GALORE_OPTIMIZER["adamw8bit"],
            layerwise=in_backward,
        )
    raise UserError(f"Unknown optimizer '{name}'.{did_you_mean(name, OPTIMIZERS)}")


def _side(shape: torch.Size, proj_type: str) -> str:
    """Which side GaLore projects: "left" R = Pᵀ G (r × n) or "right" R = G Qᵀ (m × r).

    "std" keeps the smaller dimension: right when m ≥ n, as galore-torch does.
    """
    wide = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if wide else "left"
    if proj_type == "reverse_std":
        return "left" if wide else "right"
    return proj_type


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's low-rank moments for groups that set ``rank``.

    Every ``update_proj_gap`` steps of a projected weight, P comes from the SVD of its gradient G
    (m × n): the top-r left singular vectors (R = Pᵀ G) or right ones (R = G Qᵀ), see :func:`_side`.
    Adam runs on R, so its moments are r × n (or m × r) instead of m × n; the normalised update is
    projected back and multiplied by ``scale``. Adam's arithmetic (bias correction folded into the
    step size, decoupled weight decay after the update) follows galore-torch, the reference.

    ``eight_bit``: moments of ≥ ``min_8bit_size`` numbers are stored blockwise 8-bit (bitsandbytes'
    dynamic maps), dequantized only while their own parameter updates. ``layerwise``: each
    parameter updates inside its gradient hook and its gradient is freed at once; ``step()`` and
    ``zero_grad()`` are then no-ops (gradient accumulation and clipping cannot work).

    The projection matrices are optimizer state (``state[p]["proj"]``): checkpoints resume them.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
        layerwise: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.eight_bit, self.layerwise, self.min_8bit_size = eight_bit, layerwise, min_8bit_size
        self._hooks = []
        if layerwise:
            for group in self.param_groups:
                for p in group["params"]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(group)))

    def _hook_for(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                self.update(p, group)
            p.grad = None  # freed as soon as used: the point of the layer-wise mode

        return hook

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            return loss  # the gradient hooks have updated every parameter already
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.layerwise:
            super().zero_grad(set_to_none=set_to_none)

    def update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One AdamW step of ``p`` from ``p.grad`` (projected when the group sets ``rank``)."""
        if p.grad is None:
            return
        state = self.state[p]
        step = int(state.get("step", 0))
        grad = p.grad.float()
        side = _side(p.shape, group["proj_type"]) if "rank" in group and p.ndim == 2 else None
        if side is not None:
            if "proj" not in state or step % group["update_proj_gap"] == 0:
                state["proj"] = _projection(grad, group["rank"], side)
            proj = state["proj"].float()
            grad = proj.t() @ grad if side == "left" else grad @ proj.t()
        exp_avg, exp_avg_sq = self._moments(state, grad)
        beta1, beta2 = group["betas"]
        step += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        if side is not None:
            norm_grad = (proj @ norm_grad if side == "left" else norm_grad @ proj) * group["scale"]
        p.add_(norm_grad.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        state["step"] = step
        self._store_moments(state, exp_avg, exp_avg_sq)

    def _moments(self, state: dict[str, Any], grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg_q" in state:
            return _dequantize(state, "exp_avg", signed=True), _dequantize(state, "exp_avg_sq", signed=False)
        if "exp_avg" in state:
            return state["exp_avg"].float(), state["exp_avg_sq"].float()
        return torch.zeros_like(grad), torch.zeros_like(grad)

    def _store_moments(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if self.eight_bit and exp_avg.numel() >= self.min_8bit_size:
            _quantize(state, "exp_avg", exp_avg, signed=True)
            _quantize(state, "exp_avg_sq", exp_avg_sq, signed=False)
        else:
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating-point parameter's state to the parameter's dtype: undo it
        # for the 8-bit codes
        for state in self.state.values():
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                if key in state:
                    state[key] = state[key].to(torch.uint8)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _projection(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-``rank`` left (m × r) or right (r × n) singular vectors of ``grad``."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return u[:, :rank].contiguous() if side == "left" else vh[:rank].contiguous()


_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer state


@functools.cache
def _codes(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (signed for m, unsigned for v), built once per device."""
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=signed).to(device)


def _quantize(state: dict[str, Any], key: str, value: torch.Tensor, signed: bool) -> None:
    from bitsandbytes.functional import quantize_blockwise

    q, qs = quantize_blockwise(value.contiguous(), code=_codes(signed, value.device), blocksize=_BLOCK)
    state.pop(key, None)
    state[f"{key}_q"], state[f"{key}_absmax"] = q, qs.absmax
    state[f"{key}_shape"] = torch.tensor(list(value.shape))


def _dequantize(state: dict[str, Any], key: str, signed: bool) -> torch.Tensor:
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    q = state[f"{key}_q"].to(torch.uint8)
    code = _codes(signed, q.device)
    qs = QuantState(absmax=state[f"{key}_absmax"].float(), code=code, blocksize=_BLOCK, dtype=torch.float32)
    shape = torch.Size(state[f"{key}_shape"].long().tolist())
    return dequantize_blockwise(q, qs).reshape(shape)
