"""DoRA (https://arxiv.org/abs/2402.09353): LoRA on the direction, plus a trained magnitude.

W' = m · V / ‖V‖_c with V = W + s·B·A; the layer is :class:`~lrft.methods.layers.DoraLinear`.
It is LoRA with ``dora: true`` by default, so every other choice still composes:
``method=dora method.freeze_a=true`` (DoRA with LoRA-FA's frozen A), ``quantization=nf4`` (QDoRA),
or ``method=pissa method.dora=true`` for a PiSSA init under the DoRA parametrization.
"""

from __future__ import annotations

from lrft.methods.lora import Lora
from lrft.methods.registry import register_method
from lrft.methods.schemas import DoraConfig


@register_method("dora", config=DoraConfig)
class Dora(Lora):
    """Same strategy as :class:`Lora`; the config's ``dora`` defaults to true."""
