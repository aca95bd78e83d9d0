"""PiSSA (https://arxiv.org/abs/2404.02948): adapters start at the principal part of W.

SVD W = U S Vᵀ; A = diag(√S_r) V_rᵀ / √s, B = U_r diag(√S_r) / √s, so s·B·A = U_r S_r V_rᵀ, and the
frozen base becomes the residual W − s·B·A: the output at init is the base's. ``svd_niter: null``
takes the exact SVD; N ≥ 1 the fast randomized one (``torch.svd_lowrank``, PEFT's pissa_niter_N);
``auto`` (the default) the exact one up to min(d, k) = 1024, 4 iterations above (7B's 224 exact
4096-wide SVDs are minutes of host time while the GPUs wait). The init prints its time.

QPiSSA: with ``quantization=nf4|fp4|int8`` the SVD runs on the FULL-PRECISION weight (read back
from the checkpoint, see :func:`lrft.model.quantization.source_weight`) and only the residual is
quantized, which loses less than quantizing W first. An already-quantized checkpoint is refused.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import ApplyContext
from lrft.methods.layers import LowRankLinear
from lrft.methods.lora import Lora
from lrft.methods.registry import register_method
from lrft.methods.schemas import PissaConfig
from lrft.model import quantization

EXACT_UP_TO = 1024  # svd_niter=auto: the exact SVD up to this min(d, k), randomized above
AUTO_NITER = 4  # PEFT's pissa_niter_4, the PiSSA authors' fast setting


def resolve_niter(niter: int | str | None, shape: tuple[int, ...]) -> int | None:
    """``svd_niter`` for one weight: ``auto`` is exact for small weights (tests, reference checks
    against PEFT) and randomized where the exact SVD is the init's whole cost."""
    if niter == "auto":
        return None if min(shape) <= EXACT_UP_TO else AUTO_NITER
    return niter


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None) -> tuple[torch.Tensor, ...]:
    """(A (r, k), B (d, r)) with scale · B · A = the rank-r principal part of ``weight`` (float32)."""
    w = weight.float()
    niter = resolve_niter(niter, tuple(w.shape))
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scale)
    return root.unsqueeze(1) * vh, u * root.unsqueeze(0)


@register_method("pissa", config=PissaConfig)
class Pissa(Lora):
    cfg: PissaConfig
    init_computes = True  # an SVD per adapted layer

    def init_layers(self, model: nn.Module, layers: dict[str, LowRankLinear], ctx: ApplyContext) -> None:
        c = self.cfg
        start = time.perf_counter()
        kinds = set()
        for name, layer in layers.items():
            w = quantization.source_weight(layer.base_layer)  # full precision, even for a quantized base
            if c.r > min(w.shape):
                raise UserError(f"method.r={c.r} exceeds the rank of layer {name} {tuple(w.shape)}.")
            niter = resolve_niter(c.svd_niter, tuple(w.shape))
            kinds.add("exact" if niter is None else f"randomized ({niter} iterations)")
            a, b = pissa_factors(w, c.r, layer.scale, niter)
            layer.offset_base(a, b, w)
            device = w.device
            del w
        acc = ctx.accelerator
        if layers and (acc is None or getattr(acc, "is_main_process", True)):
            print(
                f"PiSSA init: {' and '.join(sorted(kinds))} SVD of {len(layers)} layers in "
                f"{time.perf_counter() - start:.1f}s on {device.type}",
                file=sys.stderr,
            )

    def offset_source(self, layer: LowRankLinear) -> torch.Tensor | None:
        return quantization.restore_source(layer.base_layer)


__all__ = ["Pissa", "PissaConfig", "pissa_factors"]
