"""LoRA-FA (https://arxiv.org/abs/2308.03303): LoRA with A frozen after its random init.

Only B trains, so ΔW = s·B·A stays in A's row space, trainable parameters halve (r·d per layer) and
the adapted layer keeps only x̃Aᵀ (n × r) for backward instead of the input (n × k): see
:class:`~lrft.methods.layers.LowRankFn`. It is LoRA with one switch, not a new layer.
"""

from __future__ import annotations

from lrft.methods.lora import Lora
from lrft.methods.registry import register_method
from lrft.methods.schemas import LoraFAConfig


@register_method("lora_fa", config=LoraFAConfig)
class LoraFA(Lora):
    """Same strategy as :class:`Lora`; the config's ``freeze_a`` defaults to true."""
