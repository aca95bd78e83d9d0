"""The method registry: ``@register_method("lora_fa", config=LoraFAConfig)``.

Built-in methods are known up front from :data:`lrft.methods.schemas.BUILTIN` (schema, checks,
implementing module), so composing and validating a config never imports torch; a method's class
(``METHODS[name].cls`` or :func:`get_method`) imports its module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrft.errors import UserError, did_you_mean
from lrft.methods.schemas import BUILTIN

_CLASSES: dict[str, type] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type
    module: str | None = None  # where the implementation lives (imported on first use)
    check: Callable[[Any], None] | None = None  # torch-free validation of a composed config

    @property
    def cls(self) -> type:
        if self.name not in _CLASSES and self.module:
            importlib.import_module(self.module)
        return _CLASSES[self.name]

    def validate(self, root_cfg: Any) -> None:
        """Refuse impossible combinations with other config groups, before any work."""
        if self.check is not None:
            self.check(root_cfg)
        else:  # a method registered from outside: its class carries the checks
            self.cls.validate(root_cfg)


METHODS: dict[str, MethodSpec] = {
    name: MethodSpec(name, b.config, b.module, b.check) for name, b in BUILTIN.items()
}


def register_method(name: str, config: type) -> Callable[[type], type]:
    """Register a :class:`~lrft.methods.base.Method` subclass under ``name`` with its config schema."""

    def wrap(cls: type) -> type:
        spec = METHODS.get(name)
        if name in _CLASSES or (spec is not None and spec.config is not config):
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _CLASSES[name] = cls
        if spec is None:
            METHODS[name] = MethodSpec(name, config)
        return cls

    return wrap


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name fails with the closest registered ones."""
    if name not in METHODS:
        raise UserError(f"Unknown method '{name}'.{did_you_mean(name, METHODS)}")
    return METHODS[name]


def get_method(name: str) -> Any:
    """The method class registered as ``name`` (its module is imported on first use)."""
    return method_spec(name).cls


def validate_method(root_cfg: Any) -> None:
    """The method's own checks of a composed config (torch-free for the built-in methods)."""
    method_spec(root_cfg.method.name).validate(root_cfg)
