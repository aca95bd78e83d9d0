"""Memory: measure what a step keeps (:mod:`.measure`), run a model on meta (:mod:`.meta`), plan a
run's memory from its config (:mod:`.plan`) and print the plan (:mod:`.cli`, ``lrft memory``).

The names below are re-exported lazily: ``lrft memory --help`` and ``lrft --help`` import
:mod:`lrft.memory.cli` through this package, and the measuring modules import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ActivationProfile": "measure",
    "LiveBytes": "measure",
    "SavedTensors": "measure",
    "activation_profile": "measure",
    "checkpoint_layers": "measure",
    "saved_activation_bytes": "measure",
    "build_meta_model": "meta",
    "meta_forward": "meta",
    "resolve_config": "meta",
    "Plan": "plan",
    "Planner": "plan",
    "optimizer_state_bytes": "plan",
    "compose_memory": "cli",
    "memory_main": "cli",
    "shard_plan": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
