"""Build a model on PyTorch's META device from its config (shapes and dtypes, no storage).

The real model class then runs, at no cost for any model size: ``setup`` builds the non-source
ranks of a sharded run here, and the memory planner runs steps on it
(:func:`lrft.memory.on_meta.meta_forward`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    ),
    "google/gemma-3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
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
