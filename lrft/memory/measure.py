"""Measure what autograd keeps for backward, exactly, with ``saved_tensors_hooks``.

Each storage is counted once (views of one tensor share it) and the model's parameters are left out:
they exist whether or not anything is saved. On CPU the count is exact and noise-free, which is
why memory claims in lrft's docs come from this, not from allocator peaks.

The same count works on the META device, where tensors have shapes and dtypes but no data: a
forward pass there records what a real one would keep, for any model size, without allocating it.
That is how ``lrft memory`` plans (see :mod:`lrft.memory.plan`); :func:`activation_profile` adds
the per-layer split that gradient checkpointing needs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lrft.model.activations import blocks as checkpoint_layers
from lrft.model.activations import storage_key


class SavedTensors:
    """Context manager that records the storages autograd saves while it is active.

    What counts is what is still saved when the block ends: a storage saved by a graph that is
    dropped during the forward (a temporary computed with grad, then detached) is freed then, and
    forgotten at once, so a later storage at the same address is counted for itself. After the
    block, :attr:`storages` is a fixed snapshot.

    ``section`` (set by the caller, e.g. from module hooks) labels what is saved from then on, so a
    profile can say which layer keeps what; a storage belongs to the section that saved it first.
    :meth:`add` records a tensor an operation keeps outside ``save_for_backward`` (bitsandbytes'
    int8 matmul stores its input as a plain attribute, which the hooks cannot see).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._skip = {storage_key(p) for p in model.parameters()} if model else set()
        self.storages: dict[int, int] = {}
        self.sections: dict[int, str] = {}
        self.section = ""
        self._recording = False

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, nbytes = storage_key(t), st.nbytes()
        if key in self._skip or nbytes == 0 or key in self.storages:
            return
        self.storages[key] = nbytes
        self.sections[key] = self.section
        # a storage keeps one Python object while it lives: its finalizer runs when it is freed
        weakref.finalize(st, self._freed, key)

    def _freed(self, key: int) -> None:
        if self._recording:
            self.storages.pop(key, None)
            self.sections.pop(key, None)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def __enter__(self) -> SavedTensors:
        self._recording = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._recording = False

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def bytes_of(self, keys: Iterable[int]) -> int:
        return sum(self.storages.get(k, 0) for k in set(keys))


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs (parameters excluded)."""
    with SavedTensors(model) as rec:
        out = forward()
    del out
    return rec.bytes


@dataclass
class ActivationProfile:
    """What one forward pass keeps for backward, split by checkpointable layer (bytes).

    ``layers[i]``: storages first saved inside layer i; ``outside``: saved elsewhere (embeddings,
    final norm, head, loss). ``checkpointed``: the peak with non-reentrant gradient checkpointing,
    which keeps only each layer's inputs (plus what runs outside the layers) and, in backward,
    recomputes one layer at a time: max over i of |outside ∪ inputs ∪ saved by layer i|.
    """

    total: int
    layers: list[int]
    outside: int
    layer_inputs: int
    checkpointed: int
    saved: SavedTensors = field(repr=False)


def _tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


def activation_profile(
    model: nn.Module,
    forward: Callable[[], Any],
    extra_saves: Callable[[SavedTensors], list[Any]] | None = None,
) -> ActivationProfile:
    """Run ``forward()`` and split what autograd keeps by checkpointable layer (real or meta tensors).

    ``extra_saves(rec)`` may register more hooks (returning their handles) that call ``rec.add``.
    """
    layers = checkpoint_layers(model)
    rec = SavedTensors(model)
    input_sizes: dict[int, int] = {}  # storages passed into a layer: what checkpointing holds on to
    alive: list[torch.Tensor] = []
    handles = []
    for i, layer in enumerate(layers):

        def enter(mod: nn.Module, args: Any, kwargs: Any, i: int = i) -> None:
            if not torch.is_grad_enabled():
                return  # a no-grad forward (DPO's reference) keeps nothing, checkpointed or not
            rec.section = f"layer{i}"
            for t in _tensors([*args, *kwargs.values()]):
                key = storage_key(t)
                if key not in rec._skip:
                    input_sizes[key] = t.untyped_storage().nbytes()
                    alive.append(t)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            rec.section = ""

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    if extra_saves is not None:
        handles += extra_saves(rec)
    try:
        with rec:
            out = forward()
        del out
    finally:
        for h in handles:
            h.remove()
    saved = rec.storages
    keys_of = [{k for k, s in rec.sections.items() if s == f"layer{i}"} for i in range(len(layers))]
    outside = {k for k, s in rec.sections.items() if s == ""}
    kept = {k: saved.get(k, input_sizes.get(k, 0)) for k in outside | set(input_sizes)}
    base = sum(kept.values())
    # backward recomputes one layer at a time on top of what stays kept
    peak = max([base] + [base + sum(saved[k] for k in keys if k not in kept) for keys in keys_of])
    return ActivationProfile(
        total=rec.bytes,
        layers=[rec.bytes_of(keys) for keys in keys_of],
        outside=rec.bytes_of(outside),
        layer_inputs=sum(input_sizes.values()),
        checkpointed=peak if layers else rec.bytes,
        saved=rec,
    )


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that operations allocate while active (real or meta tensors).

    Every operation's outputs are tracked by storage with weak references, so a tensor counts
    from its creation until autograd, or anyone, frees it: activations, the gradients backward
    writes, and the transients in between. Storages that existed before (``model``'s parameters,
    the inputs) are left out. A forward and backward pass under it gives the step's peak beyond
    weights and optimizer state, the number an accelerator's allocator would report (less its
    rounding and fragmentation).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self._skip = {storage_key(p) for p in model.parameters()} if model else set()
        self._live: set[int] = set()
        self.current = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = storage_key(t)
                if key in self._skip or key in self._live:
                    continue
                # a storage keeps one Python object while it lives: its finalizer runs when freed
                self._live.add(key)
                self.current += st.nbytes()
                weakref.finalize(st, self._freed, key, st.nbytes())
        self.peak = max(self.peak, self.current)
        return out
