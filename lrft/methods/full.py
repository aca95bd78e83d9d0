"""Full fine-tuning: every parameter trains. The baseline every comparison is made against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lrft.errors import UserError
from lrft.methods.base import Method, MethodConfig
from lrft.methods.registry import register_method


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


@register_method("full", config=FullConfig)
class Full(Method):
    full_weights = True  # the run saves a whole model, not an adapter

    @classmethod
    def validate(cls, root_cfg: Any) -> None:
        q = root_cfg.quantization.name
        if q != "none":
            raise UserError(
                f"method=full trains every weight, and {q}-quantized weights cannot train. Use "
                "quantization=none, or train adapters on the quantized base: method=lora (QLoRA) or "
                "method=lora_fa (QLoRA-FA)."
            )
        if str(root_cfg.optimizer.name).startswith("galore"):
            raise UserError(f"optimizer={root_cfg.optimizer.name} goes with method=galore (GaLore).")

    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        model.requires_grad_(True)
        return model
