"""LoRA (https://arxiv.org/abs/2106.09685): W frozen, y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ.

The base of the whole family. Every other LoRA-family method is this one with different choices:
which factors train (``freeze_a``: LoRA-FA), the parametrization (``dora``: magnitude · direction),
the init (:meth:`Lora.init_layers`: PiSSA's SVD of W, LoRA-GA's SVD of the gradient), and the
base storage (``quantization=nf4``: QLoRA). Options compose: ``method=pissa method.dora=true``.
"""

from __future__ import annotations

import torch
from torch import nn

from lrft.methods.base import (
    ApplyContext,
    Method,
    find_targets,
    mark_modules_to_save,
    replace_module,
)
from lrft.methods.layers import DoraLinear, LowRankLinear
from lrft.methods.registry import register_method
from lrft.methods.schemas import LoraConfig


@register_method("lora", config=LoraConfig)
class Lora(Method):
    cfg: LoraConfig

    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        c = self.cfg
        targets = list(c.target_modules or defaults.get("target_modules") or ["all-linear"])
        names = find_targets(model, targets)
        _check_rank(model, names, c.r)
        model.requires_grad_(False)
        for name in names:
            replace_module(model, name, self.make_layer(model.get_submodule(name)))
        to_save = c.modules_to_save if c.modules_to_save is not None else defaults.get("modules_to_save", [])
        mark_modules_to_save(model, list(to_save))
        return model

    def initialize(self, model: nn.Module, ctx: ApplyContext) -> None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        self.init_layers(model, layers, ctx)

    def make_layer(self, base: nn.Module) -> LowRankLinear:
        c = self.cfg
        cls = DoraLinear if c.dora else LowRankLinear
        return cls(
            base,
            c.r,
            c.alpha,
            dropout=c.dropout,
            rslora=c.rslora,
            freeze_a=c.freeze_a,
            project_grad=c.project_grad,
        )

    def init_layers(self, model: nn.Module, layers: dict[str, LowRankLinear], ctx: ApplyContext) -> None:
        """Data- or weight-aware inits override this; LoRA keeps Kaiming A and zero B."""

    def offset_source(self, layer: LowRankLinear) -> torch.Tensor | None:
        """The weight a rebuilt offset layer subtracts s·B₀A₀ from (None: the base's own)."""
        return None

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A is part of the adapter even when frozen (LoRA-FA): it is random, not derivable. B₀, A₀
        # of a moved base (PiSSA, LoRA-GA) rebuild the run without recomputing an SVD or gradients.
        state = super().trainable_state_dict(model)
        for name, module in model.named_modules():
            if isinstance(module, LowRankLinear):
                for key in ("lora_A", "lora_B", "lora_A0", "lora_B0"):
                    value = getattr(module, key)
                    if value is not None:
                        state[f"{name}.{key}"] = value.detach()
        return state

    def load_trainable(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        for name, module in model.named_modules():
            if not isinstance(module, LowRankLinear) or f"{name}.lora_A0" not in state:
                continue
            a0, b0 = state.pop(f"{name}.lora_A0"), state.pop(f"{name}.lora_B0")
            if not module.is_offset:  # rebuilt with restoring=True: move the base as training did
                module.offset_base(a0, b0, self.offset_source(module))
            elif not (
                torch.equal(module.lora_A0, a0.to(module.lora_A0))
                and torch.equal(module.lora_B0, b0.to(module.lora_B0))
            ):
                source = module.original_weight()  # moved by another init: undo it, then move again
                module.lora_A0 = module.lora_B0 = None
                module.offset_base(a0, b0, source)
        super().load_trainable(model, state)


def _check_rank(model: nn.Module, names: list[str], r: int) -> None:
    """A rank-r update of a d×k weight has rank at most min(d, k): a larger r only adds parameters
    (issue 24, finding 7: r=512 on a 64-wide model trained 5x the base's size, silently)."""
    from lrft.errors import UserError

    narrow = {n: min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    over = {n: w for n, w in narrow.items() if r > w}
    if over:
        name, width = min(over.items(), key=lambda kv: kv[1])
        raise UserError(
            f"method.r={r} is larger than the layers it adapts: {name} is {width} wide on its narrow "
            f"side ({len(over)} of {len(narrow)} target layers are narrower than r), and a rank-r "
            f"update of it has rank at most {width}. Use method.r <= {min(narrow.values())}, or "
            "method=full to train whole weights."
        )
