"""Optimizers by config name. Methods build theirs through :meth:`Method.build_optimizer`."""

from __future__ import annotations

from typing import Any

import torch

from lrft.errors import UserError, did_you_mean

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(groups: list[dict[str, Any]], ocfg: Any) -> torch.optim.Optimizer:
    """``optimizer.name`` over parameter ``groups`` (each may carry its own weight_decay)."""
    if ocfg.name == "sgd":
        return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum)
    if ocfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    raise UserError(f"Unknown optimizer '{ocfg.name}'.{did_you_mean(ocfg.name, OPTIMIZERS)}")
