"""Run-folder state on disk: the final trainable state, and rebuilding a finished run from it
(training checkpoints are :mod:`lrft.train.checkpoint`'s; PEFT adapters are :mod:`lrft.export.peft`'s).

Written through :func:`lrft.run.atomic.staged_dir` (a temporary sibling, flushed, renamed into place,
marked complete last), so a killed process never leaves a folder that looks finished. Weights go
through safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from lrft.errors import UserError
from lrft.run.atomic import COMPLETE, staged_dir

TRAINABLE = "trainable.safetensors"


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"Cannot read weights file {path}: {err}") from None


def method_config(method: Any) -> dict[str, Any]:
    return asdict(method.cfg) if is_dataclass(method.cfg) else dict(method.cfg)


def save_final(
    run_dir: Path,
    method: Any,
    model: nn.Module,
    tokenizer: Any,
    cfg: DictConfig,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``run_dir/final``: the trainable state (full model for methods that train every weight).

    ``state``: the trainable state already gathered from sharded ranks (FSDP2)."""
    final = run_dir / "final"
    state = state if state is not None else method.trainable_state_dict(model)
    with staged_dir(final) as tmp:
        if method.full_weights:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            save_state(state, tmp / TRAINABLE)
        tokenizer.save_pretrained(tmp)
        meta = {"method": method_config(method), "model": OmegaConf.to_container(cfg.model, resolve=True)}
        (tmp / "lrft.json").write_text(json.dumps(meta, indent=2))
    return final


@dataclass
class LoadedRun:
    cfg: DictConfig
    model: nn.Module
    tokenizer: Any
    method: Any


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run's model: its base (hub id, local folder, or the saved random init)
    with the method applied and the final trainable state loaded. Nothing is recomputed from data.
    """
    from lrft.data import num_labels
    from lrft.methods import get_method
    from lrft.methods.base import ApplyContext
    from lrft.model.load import load_model

    run_dir = Path(run_dir).expanduser().resolve()  # base/ must read as a folder, not a hub id
    final = run_dir / "final"
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not an lrft run folder (no config.yaml).")
    if not (final / COMPLETE).is_file():
        raise UserError(f"{run_dir} has no complete final state ({final} missing or unfinished).")
    cfg = read_run_config(run_dir)
    method = get_method(cfg.method.name)(_method_config(cfg))
    model_cfg = cfg.model.copy()
    if method.full_weights:
        model_cfg.name_or_path = str(final)
    elif model_cfg.name_or_path is None:
        model_cfg.name_or_path = str(run_dir / "base")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = load_model(model_cfg, num_labels=num_labels(cfg.dataset), qcfg=cfg.quantization)
    if not method.full_weights:
        defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
        model = method.apply(model, defaults, ApplyContext(restoring=True))
        method.load_trainable(model, load_state(final / TRAINABLE))
    model.eval()
    return LoadedRun(cfg, model, tokenizer, method)


def read_run_config(run_dir: str | Path) -> DictConfig:
    """``RUN/config.yaml``, or a :class:`UserError` that says the folder is damaged and where the
    same settings are still recorded (a hand edit or a partial copy breaks the YAML)."""
    path = Path(run_dir).expanduser() / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax, encoding, or permission errors
        detail = " ".join(str(err).split())
        raise UserError(
            f"Cannot read {path}: {detail}. The run folder is damaged; its launch overrides are in "
            f"{path.parent / 'run_info.json'}: restore config.yaml from a copy, or retrain."
        ) from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "method" not in cfg:
        raise UserError(f"{path} is not an lrft run config (no model or method section).")
    return cfg


def _method_config(cfg: DictConfig) -> Any:
    from lrft.methods.registry import METHODS

    if cfg.method.name not in METHODS:
        raise UserError(f"run uses method '{cfg.method.name}', which this lrft does not have.")
    schema = OmegaConf.structured(METHODS[cfg.method.name].config)
    return OmegaConf.to_object(OmegaConf.merge(schema, cfg.method))
