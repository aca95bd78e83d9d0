"""Fine-tuning methods: each a registered strategy that transforms a model.

The registry knows every built-in method (schema and checks) without importing torch; the classes
below, and each method's implementation, are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lrft.methods.registry import METHODS, get_method, register_method

_LAZY = {
    "Method": "lrft.methods.base",
    "MethodConfig": "lrft.methods.schemas",
    "DoraLinear": "lrft.methods.layers",
    "LowRankLinear": "lrft.methods.layers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lrft.methods' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "DoraLinear",
    "LowRankLinear",
    "Method",
    "MethodConfig",
    "get_method",
    "register_method",
]
