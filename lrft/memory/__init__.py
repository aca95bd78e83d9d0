"""Memory: measure what a step keeps (:mod:`.measure`) and plan a run's memory from its config
(:mod:`.plan`, on the meta device of :mod:`lrft.model.meta`). ``lrft memory`` prints the plan
(:mod:`lrft.cli.memory`).

The names below are re-exported lazily: the measuring modules import torch.
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
    "Plan": "plan",
    "Planner": "plan",
    "optimizer_state_bytes": "plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
