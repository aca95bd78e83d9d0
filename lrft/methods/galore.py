"""GaLore (https://arxiv.org/abs/2403.03507): full-rank weights, low-rank optimizer state.

Every weight trains, as in full fine-tuning; the 2-D weights of the targeted linear layers get
Adam moments in a rank-r projection of their gradient (:class:`lrft.optim.GaLoreAdamW`), so Adam's
state shrinks from 2·m·n to 2·r·n per matrix. Everything else (embeddings, norms, biases, heads)
gets plain Adam, as in the paper. ``layerwise: true`` updates each weight inside its gradient
hook and frees that gradient at once, so the whole model's gradient never exists together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lrft.errors import UserError, did_you_mean
from lrft.methods.base import Method, MethodConfig, find_targets
from lrft.methods.registry import register_method
from lrft.optim import PROJ_TYPES, build_optimizer

# GaLore lives in the optimizer: under method=galore, AdamW runs as GaLore-AdamW (8-bit too)
GALORE_OPTIMIZER = {
    "adamw": "galore_adamw",
    "galore_adamw": "galore_adamw",
    "adamw8bit": "galore_adamw8bit",
    "galore_adamw8bit": "galore_adamw8bit",
}


@dataclass
class GaloreConfig(MethodConfig):
    name: str = "galore"
    rank: int = 128  # rank r of the gradient projection
    update_proj_gap: int = 200  # steps between SVDs of the gradient (T)
    scale: float = 0.25  # α, multiplies the projected-back update
    proj_type: str = "std"  # std (project the smaller side) | reverse_std | left | right
    layerwise: bool = False  # per-parameter updates in gradient hooks (no grad accumulation/clipping)
    # linear layers whose weights are projected; null: every linear layer but the output heads
    target_modules: list[str] | None = None


@register_method("galore", config=GaloreConfig)
class Galore(Method):
    cfg: GaloreConfig
    full_weights = True  # the run saves a whole model, not an adapter

    @classmethod
    def validate(cls, root_cfg: Any) -> None:
        m, t = root_cfg.method, root_cfg.trainer
        if root_cfg.quantization.name != "none":
            raise UserError(
                f"method=galore trains the full-rank weights, which cannot be {root_cfg.quantization.name}-"
                "quantized (bitsandbytes weights are frozen). Use quantization=none, or a low-rank method "
                "on the quantized base: method=lora (QLoRA) or method=lora_fa (QLoRA-FA)."
            )
        if root_cfg.optimizer.name not in GALORE_OPTIMIZER:
            raise UserError(
                f"method=galore keeps Adam's state low-rank; optimizer={root_cfg.optimizer.name} has no "
                "such form. Use optimizer=galore_adamw (= adamw here) or galore_adamw8bit (= adamw8bit)."
            )
        if m.rank < 1 or m.update_proj_gap < 1:
            raise UserError("method.rank and method.update_proj_gap must be >= 1.")
        if m.proj_type not in PROJ_TYPES:
            raise UserError(
                f"method.proj_type={m.proj_type!r} is not valid.{did_you_mean(m.proj_type, PROJ_TYPES)}"
            )
        if m.layerwise:
            why = "layer-wise GaLore updates each weight inside backward, as soon as its gradient exists"
            if t.grad_accum > 1:
                raise UserError(
                    f"{why}, so gradients cannot accumulate: set trainer.grad_accum=1 (or layerwise=false)."
                )
            if t.max_grad_norm > 0:
                raise UserError(
                    f"{why}, before the global norm is known: set trainer.max_grad_norm=0 (no clipping)."
                )
            if t.mixed_precision == "fp16":
                raise UserError(
                    f"{why}, before fp16 loss scaling is undone: use trainer.mixed_precision=bf16 or no."
                )

    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        model.requires_grad_(True)
        self.projected_weights(model)  # fail now, not at the optimizer, if no layer matches
        return model

    def projected_weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The 2-D weights whose optimizer state is projected (the target linear layers')."""
        names = find_targets(model, list(self.cfg.target_modules or ["all-linear"]))
        return [model.get_submodule(n).weight for n in names]

    def build_optimizer(self, model: nn.Module, ocfg: Any) -> torch.optim.Optimizer:
        c = self.cfg
        projected = [p for p in self.projected_weights(model) if p.requires_grad]
        ids = {id(p) for p in projected}
        groups = self.param_groups(model, ocfg.weight_decay, skip=ids)
        groups.append(
            {
                "params": projected,
                "weight_decay": ocfg.weight_decay,
                "rank": c.rank,
                "update_proj_gap": c.update_proj_gap,
                "scale": c.scale,
                "proj_type": c.proj_type,
            }
        )
        ocfg = OmegaConf.merge(ocfg, {"name": GALORE_OPTIMIZER[ocfg.name]})
        return build_optimizer([g for g in groups if g["params"]], ocfg, layerwise=c.layerwise)

    def param_groups(
        self, model: nn.Module, weight_decay: float, skip: set[int] | None = None
    ) -> list[dict[str, Any]]:
        skip = skip or set()
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in skip:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
