"""A run's adapter in PEFT's on-disk format, so ``peft.PeftModel.from_pretrained`` loads it without lrft.

PEFT's LoRA computes ``base(x) + (α/r) · B A x`` from ``base_model.model.<module>.lora_A.weight``
(r, k) and ``.lora_B.weight`` (d, r); modules trained in full are saved under their plain names
(``base_model.model.classifier.dense.weight``) and listed in ``modules_to_save``. Every layer is
written from ``LowRankLinear.export_factors()`` (A, B, scale, magnitude): factors relative to the
ORIGINAL base, so PiSSA / LoRA-GA come out as plain LoRA of rank 2r and DoRA as ``use_dora`` with its
magnitude vector. ``lora_alpha = scale · r`` with ``use_rslora=false`` keeps PEFT's α/r equal to the
layer's scale whatever lrft's own scaling rule was.

Also here: the ``lrft export`` command; the job and output-folder rules it shares with ``lrft merge``
are :mod:`lrft.run.output`'s.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import Method
from lrft.run.output import (
    staged_output,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"causal": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


# ---------------------------------------------------------------- PEFT adapter


def find_adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lrft.methods.layers import LowRankLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def export_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """(A (r', k), B (d, r'), scale, DoRA magnitude or None) relative to the original base weight."""
    fn = getattr(layer, "export_factors", None)
    if fn is not None:
        a, b, scale, magnitude = fn()
    else:  # plain LoRA / LoRA-FA layers: the live factors are the export
        a, b, scale, magnitude = layer.lora_A, layer.lora_B, layer.scale, None
    a, b = a.detach().float().contiguous(), b.detach().float().contiguous()
    if magnitude is None:
        # the export must reproduce the layer exactly: a variant whose factors don't would be wrong silently
        delta = layer.delta().float()
        err = float((scale * (b @ a) - delta).abs().max())
        if err > 1e-4 * max(1.0, float(delta.abs().max())):
            raise UserError(f"{type(layer).__name__} factors do not reproduce its update (error {err:.3g}).")
    magnitude = None if magnitude is None else magnitude.detach().float().contiguous().cpu()
    return a.cpu(), b.cpu(), float(scale), magnitude


def write_peft_adapter(
    model: nn.Module, method: Method, cfg: Any, out_dir: str | Path, base_path: str | None = None
) -> Path | None:
    """Write ``out_dir`` (adapter_config.json + adapter_model.safetensors) for a LoRA-family run.

    ``cfg`` is the run's composed config; ``base_path`` the base to name in the config (default: the
    run's ``model.name_or_path``, or ``<output_dir>/base`` for a random-init model). Returns None,
    writing nothing, for methods without low-rank layers (full fine-tuning, GaLore).
    """
    from safetensors.torch import save_file

    layers = find_adapted(model)
    if method.full_weights or not layers:
        return None
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dora = 0
    for name, layer in layers:
        a, b, scale, magnitude = export_factors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
        if magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude
            dora += 1
        ranks[name], alphas[name] = a.shape[0], scale * a.shape[0]
    if 0 < dora < len(layers):
        raise UserError("PEFT's format cannot mix DoRA and plain LoRA layers in one adapter.")
    saved = _modules_to_save(model, method, cfg, [n for n, _ in layers])
    for module_path, params in saved.items():
        for pname, value in params.items():
            tensors[f"{PREFIX}{module_path}.{pname}"] = value.detach().contiguous().cpu()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for n, a in alphas.items() if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[cfg.model.task],
        "base_model_name_or_path": base_path or _base_path(cfg),
        "revision": cfg.model.revision,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(method.cfg, "dropout", 0.0)),
        "target_modules": _target_names(model, [n for n, _ in layers], list(saved)),
        # layers that differ from the common rank / scale, by full module name (PEFT matches regexes)
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha or ranks[n] != r},
        "modules_to_save": sorted({_short(p, cfg, method) for p in saved}) or None,
        "use_rslora": False,
        "use_dora": dora > 0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with staged_output(Path(out_dir), overwrite=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def _configured_to_save(method: Method, cfg: Any) -> list[str]:
    names = getattr(method.cfg, "modules_to_save", None)
    return list(names if names is not None else cfg.model.get("modules_to_save") or [])


def _modules_to_save(
    model: nn.Module, method: Method, cfg: Any, adapted: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Trained parameters outside the low-rank layers, grouped by the configured module they belong to."""
    names = _configured_to_save(method, cfg)
    modules = [n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in names)]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for pname, value in method.trainable_state_dict(model).items():
        if any(pname.startswith(a + ".") for a in adapted):
            continue
        owner = max((m for m in modules if pname.startswith(m + ".")), key=len, default=None)
        if owner is None:
            raise UserError(
                f"trained parameter {pname} is neither in a low-rank layer nor in modules_to_save "
                f"({names}): PEFT's format cannot hold it."
            )
        out.setdefault(owner, {})[pname[len(owner) + 1 :]] = value
    return out


def _short(module_path: str, cfg: Any, method: Method) -> str:
    names = _configured_to_save(method, cfg)
    return next(s for s in names if module_path == s or module_path.endswith("." + s))


def _target_names(model: nn.Module, adapted: list[str], saved: list[str]) -> list[str]:
    """Last name components when they match exactly the adapted layers (as PEFT matches), else full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    hits = set()
    for name, _ in model.named_modules():
        if "base_layer" in name.split(".") or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            hits.add(name)
    return suffixes if hits == set(adapted) else sorted(adapted)


def _base_path(cfg: Any) -> str | None:
    if cfg.model.name_or_path:
        return str(cfg.model.name_or_path)
    out = OmegaConf.select(cfg, "output_dir", default=None)
    return str(Path(out).resolve() / "base") if out else None


# ---------------------------------------------------------------- lrft export


@dataclass
class ExportOptions:
    overwrite: bool = False  # replace an output folder an earlier lrft export wrote (nothing else)


@dataclass
class ExportJob:
    """Write a run's adapter in PEFT's format: peft.PeftModel.from_pretrained(base, OUT) loads it."""

    checkpoint: str = MISSING  # the run folder (RUN_DIR, or RUN_DIR/final)
    output: str = MISSING  # the folder to write the PEFT adapter into
    export: ExportOptions = field(default_factory=ExportOptions)
