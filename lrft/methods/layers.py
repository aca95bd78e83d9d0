"""The one low-rank layer every LoRA-family method composes.

LoRA (https://arxiv.org/abs/2106.09685) adds a low-rank update to a frozen linear layer::

    y = base(x) + s · dropout(x) Aᵀ Bᵀ          s = α / r   (rsLoRA: α / √r)

Shapes (PyTorch layout, ``base`` computes x Wᵀ + b with W of shape (d, k)):

- x: (..., k)   A: (r, k)   B: (d, r)   y: (..., d)

LoRA-FA (https://arxiv.org/abs/2308.03303) freezes A after its random init and trains only B.
Then dL/dB = s · gᵀ (x̃ Aᵀ) needs only the r-wide product x̃ Aᵀ and dL/dx needs no activation at
all, so the layer keeps n·r numbers for its backward instead of the n·k input. :class:`LowRankFn`
implements exactly that, and for any configuration keeps only what the requested gradients need:

- frozen A: ``x̃ Aᵀ`` (n, r) only;
- trainable A: the dropped input ``x̃`` once (n, k), plus ``x̃ Aᵀ``;
- dropout: no mask is stored, it is regenerated in backward from a saved seed.

The base layer is called as a module, so bitsandbytes 4/8-bit layers work unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask scaled by 1/(1-p), regenerated identically from ``seed``."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    return keep.bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


class LowRankFn(torch.autograd.Function):
    """s · dropout(x) Aᵀ Bᵀ with a backward that saves only what the needed gradients use."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale: float, p: float, seed: int):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xd = x.to(dtype)
            if p > 0:
                xd = xd * _dropout_mask(xd, p, seed)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = xd @ a.t()  # (..., r)
            out = (xa @ b.t()) * scale
        ctx.scale, ctx.p, ctx.seed, ctx.dtype = scale, p, seed, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # A's gradient needs the (dropped) input; B's only x̃Aᵀ; x's only the weights.
        saved_x = xd if lora_a.requires_grad else None
        ctx.save_for_backward(xa, saved_x, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xa, xd, lora_a, lora_b = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_out.to(dtype) * ctx.scale
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        g2 = g.reshape(-1, g.shape[-1])  # (n, d)
        xa2 = xa.reshape(-1, xa.shape[-1])  # (n, r)
        grad_xa = g2 @ b  # (n, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g2.t() @ xa2).to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_xa.t() @ xd.reshape(-1, xd.shape[-1])).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_xa @ a).reshape(ctx.x_shape)
            if ctx.p > 0:
                grad_x = grad_x * _dropout_mask(grad_x, ctx.p, ctx.seed)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None


class LowRankLinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update (LoRA, LoRA-FA, ...).

    Args:
        base: the layer to adapt (``nn.Linear`` or a bitsandbytes linear); kept as ``base_layer``.
        r: rank of the update.
        alpha: scale numerator, s = α / r (or α / √r with ``rslora``).
        dropout: dropout probability on the adapter's input.
        rslora: rank-stabilised scale α / √r (https://arxiv.org/abs/2312.03732).
        freeze_a: LoRA-FA: A is fixed after init and only B trains.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        freeze_a: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.p = r, alpha, dropout
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        weight = base.weight
        device = weight.device
        # Adapters live in float32 whatever the base storage (fp16/bf16/4-bit): their updates are
        # small relative to their values and would round away in half precision.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear: ΔW = 0 since B = 0
        self.lora_A.requires_grad_(not freeze_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        p = self.p if self.training else 0.0
        # The seed comes from the global RNG, so runs are reproducible and checkpoint recompute
        # (which restores RNG state) regenerates the same mask.
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return out + LowRankFn.apply(x, self.lora_A, self.lora_B, self.scale, p, seed).to(out.dtype)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A, shape (d, k), in float32 at least: what the adapter adds to the base weight."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        frozen = ", A frozen" if not self.lora_A.requires_grad else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}{frozen}"
