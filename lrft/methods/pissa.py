"""PiSSA (https://arxiv.org/abs/2404.02948): adapters start at the principal part of W.

SVD W = U S Vᵀ; A = diag(√S_r) V_rᵀ / √s, B = U_r diag(√S_r) / √s, so s·B·A = U_r S_r V_rᵀ, and the
frozen base becomes the residual W − s·B·A: the output at init is the base's. ``svd_niter: null``
takes the exact SVD; N ≥ 1 the fast randomized one (``torch.svd_lowrank``, PEFT's pissa_niter_N).

QPiSSA: with ``quantization=nf4|fp4|int8`` the SVD runs on the FULL-PRECISION weight (read back
from the checkpoint, see :func:`lrft.quantization.source_weight`) and only the residual is
quantized, which loses less than quantizing W first. An already-quantized checkpoint is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrft import quantization
from lrft.errors import UserError
from lrft.methods.base import ApplyContext
from lrft.methods.layers import LowRankLinear
from lrft.methods.lora import Lora, LoraConfig
from lrft.methods.registry import register_method


@dataclass
class PissaConfig(LoraConfig):
    name: str = "pissa"
    alpha: float = 8.0  # = r: s = 1, the paper's setting (any s works: the factors absorb 1/s)
    dropout: float = 0.0
    svd_niter: int | None = None  # null: exact SVD; N >= 1: randomized SVD with N subspace iterations


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None) -> tuple[torch.Tensor, ...]:
    """(A (r, k), B (d, r)) with scale · B · A = the rank-r principal part of ``weight`` (float32)."""
    w = weight.float()
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

    @classmethod
    def validate(cls, root_cfg: Any) -> None:
        super().validate(root_cfg)
        m = root_cfg.method
        if m.svd_niter is not None and m.svd_niter < 1:
            raise UserError(f"method.svd_niter must be null (exact SVD) or >= 1, got {m.svd_niter}.")
        if root_cfg.quantization.name != "none" and quantization.prequantized_checkpoint(root_cfg.model):
            raise UserError(
                f"model.name_or_path={root_cfg.model.name_or_path} is already quantized: PiSSA needs the "
                "full-precision weights for its SVD (QPiSSA quantizes only the residual afterwards). Point "
                "model.name_or_path at the unquantized checkpoint, or use method=lora (QLoRA) on this one."
            )

    def init_layers(self, model: nn.Module, layers: dict[str, LowRankLinear], ctx: ApplyContext) -> None:
        c = self.cfg
        for name, layer in layers.items():
            w = quantization.source_weight(layer.base_layer)  # full precision, even for a quantized base
            if c.r > min(w.shape):
                raise UserError(f"method.r={c.r} exceeds the rank of layer {name} {tuple(w.shape)}.")
            a, b = pissa_factors(w, c.r, layer.scale, c.svd_niter)
            layer.offset_base(a, b, w)
            del w

    def offset_source(self, layer: LowRankLinear) -> torch.Tensor | None:
        return quantization.restore_source(layer.base_layer)


__all__ = ["Pissa", "PissaConfig", "pissa_factors"]
