"""Run steps of a META-device model as a CUDA GPU would run them, for the memory planner.

Meta tensors have shapes and dtypes but no storage: the real model class, the real method and a
real forward and backward pass run at no cost for any model size, and :mod:`lrft.memory.measure`
counts what they would allocate. A few things need values meta tensors lack, or would keep what
CPU fallbacks keep instead of CUDA's fused kernels; :func:`meta_forward` stands in for them, each
only for meta tensors and only while it is active.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lrft.methods import layers


class _DataChecks(TorchFunctionMode):
    """Answer transformers' data-dependent checks on meta tensors ("is every token attended?", "are
    sequences packed?"), which need values meta tensors lack: the planned batch is full and
    unpacked, so the answer to each such "all" question is yes."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **(kwargs or {}))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _fused_attention(sdpa: Any) -> Any:
    """``scaled_dot_product_attention`` that, on meta, runs a fused kernel's autograd as GPUs do.

    On meta, PyTorch picks the unfused math path, which keeps the (T × T) attention matrix; real
    devices run a fused kernel that keeps q, k, v, the output and a (B, H, T) log-sum-exp. The
    CPU flash kernel's backward keeps exactly that, so its meta version stands in. Dropout inside
    attention adds only an RNG state on GPUs, so it is planned at p = 0.
    """

    def attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        a = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
        if not a["query"].is_meta:
            return sdpa(*args, **kwargs)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            a["query"], a["key"], a["value"], 0.0, bool(a.get("is_causal", False)),
            attn_mask=_detached(a.get("attn_mask")), scale=a.get("scale"),
        )  # fmt: skip
        return out

    return attention


def _fused_dropout(dropout: Any) -> Any:
    """``dropout`` that, on meta, keeps a one-byte mask as CUDA's fused kernel does.

    Off CUDA, torch multiplies by a noise tensor of the input's dtype and keeps that (4 bytes an
    element in float32); CUDA runs ``native_dropout``, which keeps a bool mask.
    """

    def fused(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if input.is_meta and training and 0.0 < p < 1.0:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    return fused


def _detached(mask: torch.Tensor | None) -> torch.Tensor | None:
    # a trained bias (T5's relative positions under full fine-tuning) runs through GPUs'
    # memory-efficient kernel, which keeps the bias like the flash one keeps a mask: same bytes
    return None if mask is None else mask.detach()


@contextmanager
def meta_forward() -> Iterator[None]:
    """Run a model on meta as it would run on a CUDA GPU, for as long as the block lasts.

    - attention and dropout keep what CUDA's fused kernels keep (:func:`_fused_attention`,
      :func:`_fused_dropout`), not what meta's (CPU-like) fallbacks would;
    - transformers' data-dependent checks get answers (:class:`_DataChecks`);
    - :class:`~lrft.methods.layers.LowRankFn` asks autocast for its compute dtype, which does not
      exist for meta tensors: autocast is off for meta (the dtype is the input's). Its dropout
      mask is plain integer arithmetic (lrft.methods.dropout), which meta tensors run as they are
      (never saved: backward regenerates it);
    - backward runs on this thread, where the stand-ins are in place.

    Each stand-in acts on meta tensors only; everything is restored on exit.
    """
    compute_dtype = layers._compute_dtype
    autocast, sdpa, dropout = torch.autocast, F.scaled_dot_product_attention, F.dropout

    def meta_compute_dtype(x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.is_meta else compute_dtype(x)

    def meta_autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    # module attributes, not a mode: checkpointing recomputes layers where modes are not active
    layers._compute_dtype = meta_compute_dtype
    torch.autocast = meta_autocast  # type: ignore[assignment,misc]
    F.scaled_dot_product_attention, F.dropout = _fused_attention(sdpa), _fused_dropout(dropout)
    try:
        with _DataChecks(), torch.autograd.set_multithreading_enabled(False):
            yield
    finally:
        layers._compute_dtype = compute_dtype
        torch.autocast = autocast  # type: ignore[misc]
        F.scaled_dot_product_attention, F.dropout = sdpa, dropout
