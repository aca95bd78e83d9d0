"""Full fine-tuning: every parameter trains. The baseline every comparison is made against."""

from __future__ import annotations

from torch import nn

from lrft.methods.base import Method
from lrft.methods.registry import register_method
from lrft.methods.schemas import FullConfig


@register_method("full", config=FullConfig)
class Full(Method):
    full_weights = True  # the run saves a whole model, not an adapter

    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        model.requires_grad_(True)
        return model
