"""Fine-tuning methods: each a registered strategy that transforms a model.

Importing this package registers every built-in method.
"""

from lrft.methods import dora, full, galore, lora, lora_fa, lora_ga, pissa  # noqa: F401  (registration)
from lrft.methods.base import Method, MethodConfig
from lrft.methods.layers import DoraLinear, LowRankLinear
from lrft.methods.registry import METHODS, get_method, register_method

__all__ = [
    "METHODS",
    "DoraLinear",
    "LowRankLinear",
    "Method",
    "MethodConfig",
    "get_method",
    "register_method",
]
