"""LoRA (https://arxiv.org/abs/2106.09685): W frozen, y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ.

The base of the whole family: LoRA-FA, and later DoRA, PiSSA and LoRA-GA, are this method with a
different init, parametrisation or set of frozen factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import (
    ApplyContext,
    Method,
    MethodConfig,
    find_targets,
    mark_modules_to_save,
    replace_module,
)
from lrft.methods.layers import LowRankLinear
from lrft.methods.registry import register_method


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # layer names to adapt (last name component) or ["all-linear"]; null: the model's default
    target_modules: list[str] | None = None
    rslora: bool = False  # scale α/√r instead of α/r
    freeze_a: bool = False  # LoRA-FA: A fixed after init, only B trains


@register_method("lora", config=LoraConfig)
class Lora(Method):
    cfg: LoraConfig

    @classmethod
    def validate(cls, root_cfg: Any) -> None:
        m = root_cfg.method
        if m.r < 1:
            raise UserError(f"method.r must be >= 1, got {m.r}.")
        if not 0.0 <= m.dropout < 1.0:
            raise UserError(f"method.dropout must be in [0, 1), got {m.dropout}.")

    def apply(
        self, model: nn.Module, defaults: dict[str, list[str]] | None = None, ctx: ApplyContext | None = None
    ) -> nn.Module:
        defaults = defaults or {}
        c = self.cfg
        targets = list(c.target_modules or defaults.get("target_modules") or ["all-linear"])
        model.requires_grad_(False)
        for name in find_targets(model, targets):
            base = model.get_submodule(name)
            layer = LowRankLinear(base, c.r, c.alpha, c.dropout, rslora=c.rslora, freeze_a=c.freeze_a)
            replace_module(model, name, layer)
        to_save = c.modules_to_save if c.modules_to_save is not None else defaults.get("modules_to_save", [])
        mark_modules_to_save(model, list(to_save))
        return model

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A is part of the adapter even when frozen (LoRA-FA): it is random, not derivable.
        state = super().trainable_state_dict(model)
        for name, module in model.named_modules():
            if isinstance(module, LowRankLinear):
                state[f"{name}.lora_A"] = module.lora_A.detach()
                state[f"{name}.lora_B"] = module.lora_B.detach()
        return state
