"""Resident bytes the planner counts without running anything: quantized weights' storage and the
optimizer's state, each from the layout its library uses (split out of :mod:`lrft.memory.plan`,
which runs the step itself).

bitsandbytes cannot run on meta, so a quantized weight's storage is counted analytically
(NF4/FP4: half a byte per weight plus block scales; int8: a byte plus one float32 scale per row).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.schema import GALORE_OPTIMIZER


def quantized_bytes(scheme: str, weight: torch.Tensor, double_quant: bool) -> int:
    """Storage of one bitsandbytes-quantized weight (d, k), scales and code tables included."""
    n = weight.numel()
    if scheme == "int8":
        return n + 4 * weight.shape[0]  # int8 values + one float32 scale (SCB) per output row
    blocks = math.ceil(n / 64)  # 4-bit: blocks of 64 share an absmax scale
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales + 4 * 16  # two weights a byte, scales, the 16-value code


def quantized_linears(model: nn.Module, mcfg: Any, qcfg: Any) -> dict[int, nn.Linear]:
    """The linear layers bitsandbytes would quantize (everything but the skipped heads)."""
    if qcfg.name == "none":
        return {}
    from lrft.model.quantization import skip_modules

    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older transformers matched by name suffix

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.endswith("." + p) for p in patterns)

    skip = skip_modules(mcfg)
    return {
        id(m): m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and should_convert_module(name, skip)
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's config name, from the object a method built (GaLore swaps AdamW for its own)."""
    from lrft.optim import GaLoreAdamW

    if isinstance(optimizer, GaLoreAdamW):
        return "galore_adamw8bit" if optimizer.eight_bit else "galore_adamw"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if type(optimizer).__name__ == "AdamW8bit":  # bitsandbytes, imported only when used
        return "adamw8bit"
    raise UserError(f"lrft memory has no state layout for {type(optimizer).__name__}.")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state once every trainable parameter has taken a step.

    Counted from the parameter groups and each optimizer's layout: torch AdamW two moments in the
    parameter's dtype (its 0-d step counters live on the CPU), SGD one momentum buffer, bitsandbytes
    8-bit AdamW one byte per moment value plus a float32 absmax per 256 (float32 moments for tensors
    under 4096 values), GaLore (lrft.optim) float32 moments of the projected gradient plus the
    projection, or 8-bit moments (same blocks) for galore_adamw8bit.
    """
    from lrft.optim import _side

    name = optimizer_kind(optimizer)
    total = 0
    qmaps = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            n, size = p.numel(), p.element_size()
            if name == "sgd":
                total += n * size if group.get("momentum", 0) else 0
            elif name == "adamw":
                total += 2 * n * size
            elif name == "adamw8bit":
                qmaps = qmaps or n >= 4096
                total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n
            elif name in GALORE_OPTIMIZER.values():
                moments = n
                if "rank" in group and p.ndim == 2:
                    m, k = p.shape
                    r = min(group["rank"], m, k)
                    left = _side(p.shape, group["proj_type"]) == "left"
                    moments = r * k if left else m * r
                    total += 4 * (m * r if left else r * k)  # the projection, float32
                eight = name.endswith("8bit") and moments >= getattr(optimizer, "min_8bit_size", 4096)
                # 8-bit: codes + float32 absmax per 256 + the int64 shape tensor, for each moment
                total += 2 * (moments + 4 * math.ceil(moments / 256) + 16) if eight else 8 * moments
    return total + (2 * 256 * 4 if qmaps else 0)  # bitsandbytes' two shared 256-value code maps
