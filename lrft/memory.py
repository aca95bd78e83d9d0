"""Measure what autograd keeps for backward, exactly, with ``saved_tensors_hooks``.

Each storage is counted once (views of one tensor share it) and the model's parameters are left out:
they exist whether or not anything is saved. On CPU the count is exact and noise-free, which is
why memory claims in lrft's docs come from this, not from allocator peaks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class SavedTensors:
    """Context manager that records the storages autograd saves while it is active."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()} if model else set()
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self._skip and st.nbytes() > 0:
            self.storages[ptr] = st.nbytes()
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs (parameters excluded)."""
    with SavedTensors(model) as rec:
        out = forward()
    del out
    return rec.bytes
