"""What ``model=hf`` leaves open, read from the checkpoint itself (task, adapter targets, heads),
and what a checkpoint folder says about itself (its name, whether it is quantized already).

Torch-free at import: ``transformers`` loads only when a checkpoint's config must be read, so
config errors and ``--help`` stay fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lrft.errors import UserError
from lrft.model.targets import CLASSIFICATION_HEADS, ENCODER_TYPES, TARGETS_BY_TYPE


def checkpoint_name(name_or_path: Any) -> str:
    """A run label from a folder or hub id: its last path component (``org/Model-1B`` -> ``Model-1B``)."""
    if not name_or_path:
        return "hf"
    last = Path(str(name_or_path).rstrip("/\\")).name or "hf"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", last)


def looks_like_path(name_or_path: str) -> bool:
    """True for what can only be a folder (``./x``, ``/x``, ``~/x``, ``a/b/c``); a bare ``org/name``
    may be a hub id."""
    s = name_or_path
    return s.startswith(("/", ".", "~")) or s.endswith("/") or s.count("/") > 1 or "\\" in s


def checkpoint_config(name_or_path: str, revision: str | None = None, remote_code: bool = False) -> Any:
    """The checkpoint's ``config.json`` as a transformers config; a missing folder is named as such."""
    from transformers import AutoConfig

    folder = Path(name_or_path).expanduser()
    if not folder.exists() and looks_like_path(name_or_path):
        raise UserError(f"model.name_or_path={name_or_path}: folder not found.")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(
            f"model.name_or_path={name_or_path}: the folder has no config.json (not a checkpoint)."
        )
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=remote_code)
    except (OSError, ValueError) as err:
        where = "" if folder.exists() else "folder not found here, and as a hub id: "
        raise UserError(
            f"model.name_or_path={name_or_path}: {where}{str(err).splitlines()[0]}\n"
            "Offline? Point model.name_or_path at a local folder."
        ) from None


def infer_task(config: Any, dataset_kind: str) -> str:
    """causal for decoder-only, seq2seq for encoder-decoder, classification for encoders on GLUE."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in ENCODER_TYPES or "ForMaskedLM" in archs or "ForSequenceClassification" in archs:
        if dataset_kind != "glue":
            raise UserError(
                f"{config.model_type} is an encoder-only model: it trains on GLUE-style classification "
                f"data (dataset=glue/...), not on {dataset_kind} data. Or set model.task= explicitly."
            )
        return "classification"
    return "causal"


def default_targets(config: Any) -> list[str]:
    return list(TARGETS_BY_TYPE.get(config.model_type, ["all-linear"]))


def resolve_model_config(cfg: Any) -> Any:
    """Fill what ``model=hf`` leaves open from the checkpoint itself, in place; returns ``cfg``.

    Task (unless ``model.task`` is set), adapter targets (unless ``model.target_modules`` is set)
    and, for classification, the head trained in full. Presets (llama7b, tiny_*) pass through.
    Prints the choices once, so a run's log says what was inferred.
    """
    from omegaconf import OmegaConf, open_dict

    m = cfg.model
    open_task = OmegaConf.is_missing(m, "task") or m.task is None
    if not open_task and (list(m.target_modules) or not m.name_or_path):
        return cfg  # a preset: everything is said
    if not m.name_or_path:
        raise UserError(
            f"model '{m.name}' needs model.name_or_path=HUB_ID_OR_FOLDER (a transformers checkpoint)."
        )
    config = checkpoint_config(str(m.name_or_path), m.revision, m.trust_remote_code)
    notes = []
    with open_dict(m):
        if open_task:
            m.task = infer_task(config, str(cfg.dataset.kind))
            notes.append(f"task {m.task} ({config.model_type})")
        if not list(m.target_modules):
            m.target_modules = default_targets(config)
            notes.append(f"target modules {', '.join(m.target_modules)}")
        if m.task == "classification" and not list(m.modules_to_save):
            m.modules_to_save = list(CLASSIFICATION_HEADS)
    if notes:
        _say_once(f"model=hf {m.name_or_path}: " + "; ".join(notes))
    return cfg


_SAID: set[str] = set()


def _say_once(text: str) -> None:
    import os

    if text in _SAID or os.environ.get("RANK", "0") != "0":
        return
    _SAID.add(text)
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def config_quantization(folder: Path) -> Any:
    try:
        return json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def prequantized_checkpoint(mcfg: Any) -> bool:
    """Whether ``model.name_or_path`` holds already-quantized weights (no full precision to read)."""
    if not mcfg.name_or_path:
        return False
    folder = Path(mcfg.name_or_path)
    if folder.is_dir():
        return config_quantization(folder) is not None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(mcfg.name_or_path, "config.json", revision=mcfg.revision)
    except Exception:
        return False
    return isinstance(cached, str) and config_quantization(Path(cached).parent) is not None
