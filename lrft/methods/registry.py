"""The method registry: ``@register_method("lora_fa", config=LoraFAConfig)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrft.errors import UserError, did_you_mean


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    config: type


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config: type) -> Callable[[type], type]:
    """Register a :class:`~lrft.methods.base.Method` subclass under ``name`` with its config schema."""

    def wrap(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = MethodSpec(name, cls, config)
        return cls

    return wrap


def get_method(name: str) -> Any:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise UserError(f"Unknown method '{name}'.{did_you_mean(name, METHODS)}")
    return METHODS[name].cls
