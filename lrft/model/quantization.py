"""Quantized base weights with bitsandbytes: NF4 / FP4 (QLoRA, arXiv 2305.14314) and int8.

Loading: hub ids and folders go through ``from_pretrained`` with a ``BitsAndBytesConfig``
(:func:`from_pretrained_kwargs`); the random-init tiny models are built in full precision, then put
through the same quantizer (:func:`quantize_built`), so both paths make identical bitsandbytes
layers that save and reload the same way.

Methods that move the base (PiSSA, LoRA-GA) read and write a quantized layer as a dense float32
matrix (:func:`dense_weight`, :func:`set_dense_weight`). QPiSSA also needs the weight as it was
BEFORE quantization (its SVD must not see the quantization error): :func:`source_weight` reads it
back from the full-precision checkpoint, one layer at a time, or from the in-memory copy that
:func:`quantize_built` keeps for a random-init model.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.model.dtypes import STORAGE_DTYPES, TORCH_DTYPES
from lrft.model.resolve import config_quantization

SOURCE_ATTR = "lrft_source"  # callable -> the layer's full-precision weight, set by load_model


def skip_modules(mcfg: Any) -> list[str]:
    """Modules kept in full precision: output heads and whatever trains fully (a task head)."""
    from lrft.model.targets import OUTPUT_HEADS

    return sorted({*OUTPUT_HEADS, *(mcfg.modules_to_save or [])})


def bnb_config(qcfg: Any, mcfg: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if qcfg.name == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=qcfg.int8_threshold,
            llm_int8_skip_modules=skip_modules(mcfg),
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg.name,
        bnb_4bit_compute_dtype=TORCH_DTYPES[qcfg.compute_dtype],
        bnb_4bit_use_double_quant=qcfg.double_quant,
        bnb_4bit_quant_storage=STORAGE_DTYPES[qcfg.quant_storage],
        llm_int8_skip_modules=skip_modules(mcfg),
    )


def from_pretrained_kwargs(qcfg: Any, mcfg: Any) -> dict[str, Any]:
    """Keyword arguments that make ``from_pretrained`` load the base quantized."""
    if qcfg is None or qcfg.name == "none":
        return {}
    return {"quantization_config": bnb_config(qcfg, mcfg)}


def quantize_built(model: nn.Module, auto: Any, qcfg: Any, mcfg: Any, dtype: Any) -> nn.Module:
    """Quantize a model built in memory (``from_config``) the way ``from_pretrained`` would.

    Going through a temporary folder makes the layers, ``config.quantization_config`` and so the
    saved base identical to a quantized hub load. The full-precision weights are kept in memory
    (the models built this way are tiny) so QPiSSA can take its SVD before quantization.
    """
    with tempfile.TemporaryDirectory(prefix="lrft-quant-") as tmp:
        # every process writes its own folder: save_pretrained writes nothing off rank 0 once
        # torch.distributed is initialised (transformers' should_save_on_this_rank)
        from safetensors.torch import save_model

        model.config.to_json_file(f"{tmp}/config.json")
        save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        quantized = auto.from_pretrained(tmp, dtype=dtype, **from_pretrained_kwargs(qcfg, mcfg))
    keep_canonical_layout(quantized)
    full = dict(model.state_dict())
    for name, module in quantized.named_modules():
        key = f"{name}.weight"
        if is_quantized(module) and key in full:
            setattr(module, SOURCE_ATTR, _memory_source(full[key].detach().clone()))
    return quantized


def keep_canonical_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (AVX512-BF16).

    That repacking happens in place at the first eval-mode forward and rounds the block scales to
    bfloat16, so the same layer would compute differently in training and in evaluation, and a
    base moved by PiSSA / LoRA-GA could not be read back exactly. GPUs never repack; CPU 4-bit is
    for tests and small runs, where exact, mode-independent numbers matter more than speed.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _memory_source(weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: weight


def finish_pretrained(model: nn.Module, mcfg: Any) -> nn.Module:
    """After a quantized ``from_pretrained``: fixed 4-bit layout, full-precision weights readable."""
    keep_canonical_layout(model)
    attach_checkpoint_sources(model, mcfg.name_or_path, mcfg.revision)
    return model


def attach_checkpoint_sources(model: nn.Module, name_or_path: str, revision: str | None = None) -> None:
    """Let each quantized layer read its full-precision weight back from the checkpoint, lazily.

    Nothing is read now; a layer reads only its own tensor when a method asks for it (QPiSSA), so
    at most one layer's weight is in full precision at a time. Layers of an already-quantized
    checkpoint get no source (there is no full-precision weight to read).
    """
    folder = _checkpoint_folder(name_or_path, revision)
    if folder is None or config_quantization(folder) is not None:
        return
    index = _safetensors_index(folder)
    if not index:
        return
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        key = _match_key(name, index)
        if key is not None:
            setattr(module, SOURCE_ATTR, _file_source(index[key], key))


def _file_source(file: Path, key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor(key)

    return read


def _checkpoint_folder(name_or_path: str, revision: str | None) -> Path | None:
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:  # a hub id that from_pretrained has just fetched: its cached snapshot
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                revision=revision,
                local_files_only=True,
                allow_patterns=["*.json", "*.safetensors"],
            )
        )
    except Exception:
        return None


def _safetensors_index(folder: Path) -> dict[str, Path]:
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def _match_key(module_name: str, index: dict[str, Path]) -> str | None:
    """The checkpoint key of a module's weight; prefixes may differ (``model.`` vs none)."""
    parts = module_name.split(".")
    for start in range(len(parts)):
        suffix = ".".join(parts[start:]) + ".weight"
        hits = [k for k in index if k == suffix or k.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None  # ambiguous: better no source than the wrong layer's weight
    return None


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' linear layers; none until a quantized model has imported bitsandbytes."""
    bnb = _bnb()
    return () if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, quantized_linear_types())


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float32 (d, k) matrix: dequantized for bitsandbytes layers.

    A float64 weight stays float64 (tests compare against exact references).
    """
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(*_canonical_4bit(module.weight)).float()
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, scb).float()
    w = module.weight.detach()
    return w.to(torch.promote_types(w.dtype, torch.float32))  # float32, or float64 if it is


def _canonical_4bit(weight: Any) -> tuple[torch.Tensor, Any]:
    """(packed data, quant state) in bitsandbytes' standard layout.

    On CPUs with AVX512-BF16, an eval-mode forward repacks a 4-bit weight in place into a layout
    that ``dequantize_4bit`` does not read; undo that on copies, leaving the layer as it is.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by ``weight`` (float), re-quantizing it for bitsandbytes layers."""
    bnb = _bnb()
    old = module.weight
    device = old.device
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        _, state = _canonical_4bit(old)
        new = bnb.nn.Params4bit(
            weight.to(state.dtype).cpu(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(device)  # moving a Params4bit quantizes it
    elif bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        new = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(device)
        module.state.CB = module.state.SCB = None  # the next forward takes the new int8 matrix
    else:
        old.copy_(weight.to(old.dtype))


def source_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight before quantization, float32: QPiSSA's SVD input.

    A plain layer is its own source. A quantized one reads its checkpoint (see
    :func:`attach_checkpoint_sources`); without one, :class:`UserError` explains what to do.
    """
    if not is_quantized(module):
        return dense_weight(module)
    read = getattr(module, SOURCE_ATTR, None)
    if read is None:
        raise UserError(
            "This layer is quantized and its full-precision weight cannot be read back (an "
            "already-quantized checkpoint). PiSSA takes the SVD of the full-precision weight and then "
            "quantizes the residual (QPiSSA): point model.name_or_path at the unquantized checkpoint and "
            "keep quantization=nf4|fp4|int8, or use method=lora (QLoRA) on this checkpoint."
        )
    return read().to(device=module.weight.device, dtype=torch.float32)


def restore_source(module: nn.Module) -> torch.Tensor:
    """Like :func:`source_weight` when rebuilding a saved run: falls back to the dequantized weight.

    A random-init base is saved after quantization, so its full precision is gone; the rebuilt
    residual then differs from the trained one by the quantization error, which is reported.
    """
    if is_quantized(module) and getattr(module, SOURCE_ATTR, None) is None:
        warnings.warn(
            "rebuilding a moved (PiSSA / LoRA-GA) quantized layer from its quantized base: outputs "
            "match the trained run up to the quantization error",
            stacklevel=2,
        )
        return dense_weight(module)
    return source_weight(module)


__all__ = [
    "attach_checkpoint_sources",
    "bnb_config",
    "dense_weight",
    "finish_pretrained",
    "from_pretrained_kwargs",
    "is_quantized",
    "quantize_built",
    "set_dense_weight",
    "source_weight",
]
