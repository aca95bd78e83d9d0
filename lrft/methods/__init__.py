"""Fine-tuning methods: each a registered strategy that transforms a model.

Importing this package registers every built-in method.
"""

from lrft.methods import full, lora, lora_fa  # noqa: F401  (registration side effects)
from lrft.methods.base import Method, MethodConfig
from lrft.methods.layers import LowRankLinear
from lrft.methods.registry import METHODS, get_method, register_method

__all__ = ["METHODS", "LowRankLinear", "Method", "MethodConfig", "get_method", "register_method"]
