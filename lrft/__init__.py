"""lrft: memory-efficient low-rank fine-tuning (LoRA-FA, LoRA, full) from composable configs.

The Python API mirrors the CLI::

    import lrft
    model = lrft.apply_method(model, "lora_fa", r=8, alpha=16, dropout=0.0, target_modules=["q_proj"])
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing lrft (and its CLI) must not import torch
    from torch import nn

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that an optional kernels package is missing; its own
# CPU path works without it, so the warning only alarms users
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def apply_method(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Make ``model`` ready to train with ``method`` (``full``, ``lora``, ``lora_fa``, ...).

    ``options`` are the method's config keys (``r``, ``alpha``, ``dropout``, ``target_modules``,
    ``rslora``, ``modules_to_save``...). Works on any transformers model and on a plain
    ``nn.Module`` with ``nn.Linear`` layers; without ``target_modules`` every linear layer except
    output heads is adapted. Returns the model (changed in place) with only the method's
    parameters trainable.
    """
    from lrft.errors import UserError, did_you_mean
    from lrft.methods.registry import METHODS, get_method

    cls = get_method(method)
    schema = METHODS[method].config
    valid = [f.name for f in fields(schema) if f.name != "name"]
    for key in options:
        if key not in valid:
            raise UserError(f"apply_method('{method}'): unknown option '{key}'.{did_you_mean(key, valid)}")
    if isinstance(options.get("target_modules"), str):
        options["target_modules"] = [options["target_modules"]]
    return cls(schema(**options)).apply(model)


def trainable_state_dict(model: nn.Module, method: str) -> dict[str, Any]:
    """What a checkpoint of ``model`` trained with ``method`` holds (adapters, trained heads)."""
    from lrft.methods.registry import METHODS

    return METHODS[method].cls(METHODS[method].config()).trainable_state_dict(model)


__all__ = ["__version__", "apply_method", "trainable_state_dict"]
