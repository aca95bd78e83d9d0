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
- dropout: no mask is stored, backward regenerates it from its keys: in lrft's loop the
  micro-batch's (n,) token keys, shared by every layer, and the layer's ℓ, so the mask follows
  the example and not the split (:mod:`lrft.methods.dropout_keys`); elsewhere a 4-byte seed
  tensor (:mod:`lrft.methods.dropout`: the same bits from an eager or a fused kernel).

The base layer is called as a module, so bitsandbytes 4/8-bit layers work unchanged. The other
methods are choices on this one layer: an init that moves the base (PiSSA, LoRA-GA:
:meth:`LowRankLinear.offset_base`), the magnitude/direction parametrization (DoRA:
:class:`DoraLinear`), which factors train (LoRA-FA: ``freeze_a``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lrft.methods.dropout import drop, new_seed
from lrft.methods.dropout_keys import layer_key, row_keys, token_keys
from lrft.model.quantization import dense_weight, set_dense_weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class LowRankFn(torch.autograd.Function):
    """s · dropout(x) Aᵀ Bᵀ with a backward that saves only what the needed gradients use."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale: float, p: float, grad_proj=None, kernel="auto", key=0):
        dtype = _compute_dtype(x)
        tokens = token_keys(x, key) if p > 0 else None
        seed = new_seed(x.device) if p > 0 and tokens is None else None
        # dropout's 1/(1-p) is folded into the scale: s·((x⊙keep)/(1-p))AᵀBᵀ = s/(1-p)·(x⊙keep)AᵀBᵀ,
        # so applying the mask is one multiply by a bool tensor, here and in backward
        scale = scale / (1.0 - p) if p > 0 else scale
        with torch.autocast(x.device.type, enabled=False):
            xd = x.to(dtype)
            if p > 0:
                xd = drop(xd, p, seed if tokens is None else row_keys(tokens, key), kernel)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = xd @ a.t()  # (..., r)
            out = (xa @ b.t()) * scale
        # the seed (a 0-d int32 tensor) or the token keys (one tensor shared by every layer of the
        # micro-batch) ride on ctx, not save_for_backward: they are the dropout's whole state
        ctx.scale, ctx.p, ctx.seed, ctx.dtype, ctx.grad_proj = scale, p, seed, dtype, grad_proj
        ctx.kernel, ctx.tokens, ctx.key = kernel, tokens, key
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
            grad_b = g2.t() @ xa2
            if ctx.grad_proj is not None:  # (r, r), see LowRankLinear.project_grad
                # applied in float32: rounding the inverse to bf16 (autocast's compute dtype)
                # would put ~3 significant digits of error into every projected update
                grad_b = grad_b.float() @ ctx.grad_proj.float()
            grad_b = grad_b.to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_xa.t() @ xd.reshape(-1, xd.shape[-1])).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_xa @ a).reshape(ctx.x_shape)
            if ctx.p > 0:
                rows = ctx.seed if ctx.tokens is None else row_keys(ctx.tokens, ctx.key)
                grad_x = drop(grad_x, ctx.p, rows, ctx.kernel)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


class LowRankLinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update (LoRA, LoRA-FA, PiSSA, LoRA-GA).

    Args:
        base: the layer to adapt (``nn.Linear`` or a bitsandbytes linear); kept as ``base_layer``.
        r: rank of the update.
        alpha: scale numerator, s = α / r (or α / √r with ``rslora``).
        dropout: dropout probability on the adapter's input.
        rslora: rank-stabilised scale α / √r (https://arxiv.org/abs/2312.03732).
        freeze_a: LoRA-FA: A is fixed after init and only B trains.
        project_grad: LoRA-FA refinement: B's gradient becomes g_B (A Aᵀ)⁻¹ / s², the B-update whose
            ΔW best approximates full fine-tuning's (PEFT's ``LoraFAOptimizer``); needs ``freeze_a``.

    Inits that start from non-zero factors (PiSSA, LoRA-GA) call :meth:`offset_base`: the base
    becomes W − s·B₀A₀ so the output is unchanged, and B₀, A₀ are kept (buffers ``lora_B0``,
    ``lora_A0``) so :meth:`delta` and :meth:`export_factors` stay relative to the ORIGINAL W.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        freeze_a: bool = False,
        project_grad: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.p = r, alpha, dropout
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        self.project_grad = project_grad
        # which kernel computes the dropout mask (lrft.methods.dropout; trainer.dropout_kernel):
        # an execution choice, not state, so it is not saved
        self.dropout_kernel = "auto"
        # ℓ of the split-invariant mask (lrft.methods.dropout_keys.key_layers sets it from the name)
        self.dropout_key = 0
        self._proj: torch.Tensor | None = None  # _grad_proj's cache and the A it was computed from
        self._proj_key: tuple[Any, ...] | None = None
        weight = base.weight
        device = weight.device
        # Adapters live in float32 whatever the base storage (fp16/bf16/4-bit): their updates are
        # small relative to their values and would round away in half precision.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear: ΔW = 0 since B = 0
        self.lora_A.requires_grad_(not freeze_a)
        # set by offset_base: W_original = W_base + s·B₀A₀ (r(k + d) numbers, the adapter's own size)
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        # set by adapters_off: the layer computes its ORIGINAL output (a preference objective's
        # reference model, without a copy of the model)
        self.reference = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return self.original(x)
        out = self.base_layer(x)
        return out + self.adapter(x, out.dtype)

    def original(self, x: torch.Tensor) -> torch.Tensor:
        """The layer before any training: x W_originalᵀ + b. With an offset base (PiSSA, LoRA-GA)
        that is x W_baseᵀ + s · x A₀ᵀ B₀ᵀ: no (d, k) weight is rebuilt."""
        out = self.base_layer(x)
        if not self.is_offset:
            return out
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xa = x.to(dtype) @ self.lora_A0.to(dtype).t()
            return out + ((xa @ self.lora_B0.to(dtype).t()) * self.scale).to(out.dtype)

    def adapter(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ in ``dtype``, through :class:`LowRankFn`."""
        p = self.p if self.training else 0.0
        proj = self._grad_proj()
        out = LowRankFn.apply(
            x, self.lora_A, self.lora_B, self.scale, p, proj, self.dropout_kernel, self.dropout_key
        )
        return out.to(dtype)

    def _grad_proj(self) -> torch.Tensor | None:
        """(A Aᵀ + δI)⁻¹ / s² (PEFT's ridge δ = 1e-8), r × r, float32, computed once per A.

        A is frozen under ``project_grad``, so the pinv (a host sync on CUDA) is cached and
        recomputed only when A changes (an init, :meth:`offset_base`, a checkpoint load: each
        bumps A's version counter) or moves device. Autocast is off: a bf16 Gram matrix of a
        near-orthogonal A would make the inverse meaningless.
        """
        if not self.project_grad:
            return None
        a = self.lora_A
        key = (a._version, a.device, a.data_ptr())
        if self._proj_key != key or self._proj is None:
            with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
                a32 = a.detach().float()
                eye = torch.eye(self.r, device=a.device)
                self._proj = torch.linalg.pinv(a32 @ a32.t() + 1e-8 * eye) / self.scale**2
            self._proj_key = key
        return self._proj

    @property
    def is_offset(self) -> bool:
        return self.lora_A0 is not None

    @torch.no_grad()
    def offset_base(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor | None = None
    ) -> None:
        """Start from factors A₀, B₀ and move the base so the output is unchanged: W ← W − s·B₀A₀.

        ``weight`` is the float weight to offset (QPiSSA passes the full-precision one); by default
        the base's own, dequantized. A quantized base is re-quantized after the subtraction, which
        is done once, in float32, from A₀ and B₀, so rebuilding a run repeats it bit for bit.
        """
        if self.is_offset:
            raise RuntimeError("this layer's base was already offset")
        w = dense_weight(self.base_layer) if weight is None else weight.float()
        a0 = lora_a.detach().float().to(w.device)
        b0 = lora_b.detach().float().to(w.device)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)
        # laid out as the parameters: original() then multiplies the same bits the same way as
        # the adapter at init, so π_ref equals the untrained policy exactly, not to matmul rounding
        self.lora_A0, self.lora_B0 = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        set_dense_weight(self.base_layer, w - self.scale * (b0 @ a0))

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The base weight before any offset (float32; dequantized for quantized bases)."""
        w = dense_weight(self.base_layer)
        if self.is_offset:
            w = w + self.scale * (self.lora_B0 @ self.lora_A0)
        return w

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """ΔW, shape (d, k), float32 at least, relative to the ORIGINAL base weight: s·(BA − B₀A₀)."""
        a, b, scale, _ = self.export_factors()
        return scale * (b @ a)

    @torch.no_grad()
    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """(A (r', k), B (d, r'), s, magnitude) with ΔW = s·B·A relative to the original base.

        An offset layer returns the rank-2r pair [A; A₀], [B | −B₀]: s(BA − B₀A₀) as one LoRA.
        """
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        a, b = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        if self.is_offset:
            a = torch.cat([a, self.lora_A0.to(dtype)], dim=0)
            b = torch.cat([b, -self.lora_B0.to(dtype)], dim=1)
        return a, b, self.scale, None

    def extra_repr(self) -> str:
        frozen = ", A frozen" if not self.lora_A.requires_grad else ""
        offset = ", base offset" if self.is_offset else ""
        shape = f"in={self.in_features}, out={self.out_features}, r={self.r}"
        return f"{shape}, scale={self.scale:g}{frozen}{offset}"


class DoraLinear(LowRankLinear):
    """DoRA (https://arxiv.org/abs/2402.09353): magnitude times direction, W' = m · V / ‖V‖_c.

    V = W + s·B·A and ‖·‖_c is the norm of each output row (over the input dimension, a vector of
    d). m starts at ‖V‖_c (so W' = W) and trains with the factors. The forward never forms W'::

        y = (m / ‖V‖_c) ⊙ (x Wᵀ + s · dropout(x) Aᵀ Bᵀ) + b

    ‖V‖_c is treated as a constant in backward (paper sec. 4.3), so no (d, k) tensor is saved: the
    factors keep :class:`LowRankFn`'s memory property and m's gradient needs only the (n, d)
    pre-scale output. Any init composes (PiSSA, LoRA-GA): m is re-set after the base moves.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base, r, alpha, **kwargs)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=self.lora_A.device))
        self.reset_magnitude()

    @torch.no_grad()
    def direction(self) -> torch.Tensor:
        """V = W_base + s·B·A, float32 (d, k); never part of the autograd graph."""
        w = dense_weight(self.base_layer)
        return w + self.scale * (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype))

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        self.lora_magnitude.copy_(self.direction().norm(dim=1))

    @torch.no_grad()
    def offset_base(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor | None = None
    ) -> None:
        super().offset_base(lora_a, lora_b, weight)
        self.reset_magnitude()  # ‖W_res + s·B₀A₀‖_c = ‖W‖_c: the output is still the base's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:  # W_original: m and the direction are the training's, not the reference's
            return self.original(x)
        out = self.base_layer(x)
        bias = self.base_layer.bias
        pre = out if bias is None else out - bias
        norm = self.direction().norm(dim=1)  # no_grad: the detached ‖V‖_c
        c = (self.lora_magnitude / norm).to(out.dtype)
        y = c * (pre + self.adapter(x, out.dtype))
        return y if bias is None else y + bias

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """ΔW = m · V / ‖V‖_c − W_original, float32 (d, k)."""
        v = self.direction()
        merged = (self.lora_magnitude.to(v.dtype) / v.norm(dim=1)).unsqueeze(1) * v
        return merged - self.original_weight()

    @torch.no_grad()
    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        a, b, scale, _ = super().export_factors()
        return a, b, scale, self.lora_magnitude.detach().float()


def use_dropout_kernel(model: nn.Module, kernel: str) -> int:
    """Set every low-rank layer's dropout kernel ("auto" | "eager" | "fused", see
    :mod:`lrft.methods.dropout`); returns how many layers were set."""
    from lrft.schema import DROPOUT_KERNELS

    if kernel not in DROPOUT_KERNELS:
        raise ValueError(f"dropout kernel must be one of {DROPOUT_KERNELS}, got {kernel!r}")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for layer in layers:
        layer.dropout_kernel = kernel
    return len(layers)


def key_layers(model: nn.Module) -> int:
    """Give every low-rank layer the ℓ of its split-invariant dropout mask from its name in
    ``model`` (:mod:`lrft.methods.dropout_keys`); returns how many were keyed."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, layer in layers:
        layer.dropout_key = layer_key(name)
    return len(layers)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[int]:
    """Every low-rank layer of ``model`` computes its original output inside the block: the
    model as it was before training (DPO's reference π_ref), at no memory cost. Yields how many
    layers were switched; restores them on exit."""
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for layer in layers:
        layer.reference = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.reference = False
