"""Training objectives, a config group like the methods: ``objective=sft`` (the default token
loss) or a preference objective on ``dataset=preference`` pairs (``dpo``, ``ipo``, ``orpo``,
``simpo``). A new objective is one module with a :class:`~lrft.objectives.preference.PairObjective`
registered here, one schema in :mod:`lrft.objectives.schemas` and one YAML in configs/objective/.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lrft.errors import UserError, did_you_mean
from lrft.objectives.schemas import OBJECTIVES

_CLASSES: dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _CLASSES:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        _CLASSES[name] = cls
        return cls

    return wrap


def _objective_cfg(cfg: Any) -> Any:
    return cfg.get("objective") if isinstance(cfg, dict) else getattr(cfg, "objective", None)


def objective_name(cfg: Any) -> str:
    """The run's objective (``sft`` for configs written before the group existed)."""
    objective = _objective_cfg(cfg)
    name = getattr(objective, "name", None) if objective is not None else None
    return str(name or "sft")


def get_objective(cfg: Any) -> Any:
    """The run's objective instance, or None for ``sft`` (the loop's own token loss)."""
    name = objective_name(cfg)
    if name not in OBJECTIVES:
        raise UserError(f"Unknown objective '{name}'.{did_you_mean(name, OBJECTIVES)}")
    spec = OBJECTIVES[name]
    if spec.module is None:
        return None
    if name not in _CLASSES:
        importlib.import_module(spec.module)
    return _CLASSES[name](_objective_cfg(cfg))
