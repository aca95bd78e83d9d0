"""GaLore (https://arxiv.org/abs/2403.03507): full-rank weights, low-rank optimizer state.

Every weight trains, as in full fine-tuning; the 2-D weights of the targeted linear layers get
Adam moments in a rank-r projection of their gradient (:class:`lrft.optim.GaLoreAdamW`), so Adam's
state shrinks from 2·m·n to 2·r·n per matrix. Everything else (embeddings, norms, biases, heads)
gets plain Adam, as in the paper. ``layerwise: true`` updates each weight inside its gradient
hook and frees that gradient at once, so the whole model's gradient never exists together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import Method, find_targets
from lrft.methods.registry import register_method
from lrft.methods.schemas import GaloreConfig


@register_method("galore", config=GaloreConfig)
class Galore(Method):
    cfg: GaloreConfig
    full_weights = True  # the run saves a whole model, not an adapter

    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        model.requires_grad_(True)
        self.projected_weights(model)  # fail now, not at the optimizer, if no layer matches
        return model

    def projected_weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The 2-D weights whose optimizer state is projected (the target linear layers')."""
        names = find_targets(model, list(self.cfg.target_modules or ["all-linear"]))
        return [model.get_submodule(n).weight for n in names]

    @property
    def updates_in_backward(self) -> bool:
        return bool(self.cfg.layerwise)

    def refuse(self, accelerator: Any, model: nn.Module) -> None:
        super().refuse(accelerator, model)
        if self.cfg.layerwise and accelerator.num_processes > 1:
            raise UserError(
                "layer-wise GaLore (method.layerwise=true) updates each weight inside backward, "
                "before DDP has averaged its gradient across processes, so ranks would diverge. Use "
                "method.layerwise=false with several processes, or train layer-wise in one process."
            )

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Plain decay / no-decay groups, and the target weights in one projected group: its
        ``rank`` and projection settings make the optimizer GaLore's (:mod:`lrft.optim`)."""
        c = self.cfg
        projected = [p for p in self.projected_weights(model) if p.requires_grad]
        ids = {id(p) for p in projected}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in ids:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {
                "params": projected,
                "weight_decay": weight_decay,
                "rank": c.rank,
                "update_proj_gap": c.update_proj_gap,
                "scale": c.scale,
                "proj_type": c.proj_type,
            },
        ]
