"""Build a model on PyTorch's META device from its config, apply a method, run steps there.

Meta tensors have shapes and dtypes but no storage: the real model class, the real method and a
real forward and backward pass run at no cost for any model size, and :mod:`lrft.memory.measure` counts
what they would allocate. A few things need values meta tensors lack; :func:`meta_forward` stands
in for them, each only for meta tensors and only while it is active.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lrft.errors import UserError
from lrft.model.dtypes import TORCH_DTYPES
from lrft.model.hub import offline_by_env

# Published config.json values of the models lrft has recipes for, so `lrft memory` works offline.
# Used only when the hub cache has no copy; the output says which source it took.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "huggyllama/llama-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
    ),
    "huggyllama/llama-13b": dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40, max_position_embeddings=2048, rms_norm_eps=1e-6,
    ),
    "FacebookAI/roberta-base": dict(
        model_type="roberta", vocab_size=50265, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ),
    "FacebookAI/roberta-large": dict(
        model_type="roberta", vocab_size=50265, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ),
    "google-t5/t5-base": dict(
        model_type="t5", vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12,
        relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ),
    "google-t5/t5-large": dict(
        model_type="t5", vocab_size=32128, d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16,
        relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ),
}  # fmt: skip
_AUTO = {
    "causal": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
GLUE_TARGET_TOKENS = 8  # seq2seq GLUE targets are one label word and </s>: a few tokens at most


def resolve_config(mcfg: Any, num_labels: int | None) -> tuple[Any, str]:
    """The model's transformers config and where it came from, without downloading weights."""
    from transformers import AutoConfig

    from lrft.model.load import head_kwargs

    kw = head_kwargs(mcfg.task, num_labels)
    if not mcfg.name_or_path:
        if not mcfg.arch:
            raise UserError(f"model '{mcfg.name}' builds from_config and needs model.arch.")
        return AutoConfig.for_model(mcfg.arch, **dict(mcfg.from_config), **kw), "model.from_config"
    src, remote = str(mcfg.name_or_path), mcfg.trust_remote_code
    if Path(src).is_dir():
        return AutoConfig.from_pretrained(src, trust_remote_code=remote, **kw), f"{src}/config.json"
    try:
        cfg = AutoConfig.from_pretrained(
            src, revision=mcfg.revision, local_files_only=True, trust_remote_code=remote, **kw
        )
        return cfg, f"{src} config.json (hub cache)"
    except (OSError, ValueError):
        pass
    if src in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[src])
        return AutoConfig.for_model(
            known.pop("model_type"), **known, **kw
        ), f"{src} (bundled copy of config.json)"
    if not offline_by_env():
        try:
            cfg = AutoConfig.from_pretrained(src, revision=mcfg.revision, trust_remote_code=remote, **kw)
            return cfg, f"{src} config.json (hub)"
        except OSError:
            pass
    known = ", ".join(KNOWN_CONFIGS)
    raise UserError(
        f"No config for model.name_or_path={src}: not a folder, not in the hub cache, hub unreachable. "
        f"Point it at a folder with config.json, or use one lrft knows offline: {known}."
    )


def build_meta_model(mcfg: Any, config: Any) -> nn.Module:
    """The model class ``lrft train`` would load, with every tensor on the meta device."""
    import transformers

    dtype = TORCH_DTYPES.get(mcfg.dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if mcfg.attn_implementation:
        config._attn_implementation = mcfg.attn_implementation
    auto = getattr(transformers, _AUTO[mcfg.task])
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # as lrft train: no KV cache while training
    return model.train()


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
    from lrft.methods import layers

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
