"""What a step keeps for backward: checkpoint N of the L blocks, offload saved activations to host.

**Selective checkpointing.** Checkpointing a block keeps only its input (B·T·d) and recomputes the
rest in backward, at the cost of one more forward of that block. Checkpointing every block is
all or nothing; :func:`checkpoint_blocks` checkpoints N of the L repeated blocks (transformers'
``GradientCheckpointingLayer``: decoder layers, T5 and RoBERTa blocks), evenly spread, so a run
recomputes only as much as its memory needs. LoRA-FA keeps less per block than LoRA (X·A, r-wide,
instead of X), so at one budget it needs fewer checkpointed blocks: that is its speed.

**Offloading** (:class:`Offloader`): while a block runs forward, each tensor autograd saves (for a
checkpointed block: its input) is copied to pinned host memory on a side stream and copied back
when backward needs it, the technique of torchtune's and TRL's activation offloading. On a CPU
the activations already live in host memory: :func:`offload_blocks` does nothing and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors cost more in copies and bookkeeping than they free


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage: its address, or for meta tensors (address 0) the storage object."""
    st = t.untyped_storage()
    return st._cdata if t.is_meta else st.data_ptr()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers checkpoints one by one (the outermost
    ``GradientCheckpointingLayer``s: decoder layers, T5 and RoBERTa blocks), in forward order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no common base class, so no per-block switch
        return []
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, GradientCheckpointingLayer):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def spread(n: int, total: int) -> list[int]:
    """``n`` of ``total`` indices, evenly spread (0 <= n <= total)."""
    n = max(0, min(int(n), total))
    return sorted({(i * total) // n for i in range(n)}) if n else []


def resolve_count(setting: Any, total: int) -> int:
    """``trainer.gradient_checkpointing`` (false | true | N) as a number of checkpointed blocks.

    A model without per-block switches (``total`` 0) is all or nothing: any N > 0 means on."""
    if setting == "auto":
        raise ValueError("gradient_checkpointing=auto is resolved by the planner before this")
    if isinstance(setting, bool) or setting is None:
        count = total if setting else 0
    else:
        count = max(0, min(int(setting), total)) if total else int(int(setting) > 0)
    return max(count, 1) if total == 0 and setting else count


def checkpointing(model: nn.Module) -> bool:
    """Whether any block of ``model`` is checkpointed (transformers' name for it changed in v5)."""
    inner = getattr(model, "_orig_mod", model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(inner), name) or hasattr(inner, name):
            return bool(getattr(inner, name))
    return False


def checkpoint_blocks(model: nn.Module, n: int) -> list[int]:
    """Checkpoint ``n`` of the model's blocks (evenly spread); 0 turns checkpointing off.

    Non-reentrant checkpointing needs no input that requires grad, so the embedding hook
    transformers adds for the reentrant kind is taken out again: it would make backward compute
    the gradient of the frozen embeddings' output for nothing. Returns the indices checkpointed;
    a model without per-block switches is all or nothing."""
    inner = getattr(model, "_orig_mod", model)
    if n <= 0:
        if checkpointing(inner):
            _disable(inner)
        return []
    had_hook = bool(getattr(inner, "_require_grads_hooks", None)) or hasattr(inner, "_require_grads_hook")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not had_hook and hasattr(inner, "disable_input_require_grads"):
        inner.disable_input_require_grads()
    found = blocks(inner)
    chosen = spread(n, len(found))
    for i, block in enumerate(found):
        block.gradient_checkpointing = i in chosen
    return chosen if found else [0]


def _disable(model: nn.Module) -> None:
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


class Offloader:
    """Pack and unpack hooks of ``torch.autograd.graph.saved_tensors_hooks`` that move saved
    activations to host memory and back.

    ``to_host(t) -> handle`` and ``to_device(handle) -> tensor`` do the copies; the defaults are
    CUDA's: a pinned host buffer filled on a side stream (the compute stream goes on; the event
    says when the copy is done, and ``record_stream`` keeps the allocator from reusing the source
    before that), and a copy back on the compute stream once the event has passed. Parameters,
    their views, tensors under ``min_bytes`` and tensors on ``stay_on`` devices (already in host
    memory) stay where they are (counted in ``kept``). The planner passes copies that only keep a
    tensor's shape, so an offloaded activation stops counting on the meta device.
    """

    def __init__(
        self,
        model: nn.Module,
        to_host: Callable[[torch.Tensor], Any] | None = None,
        to_device: Callable[[Any], torch.Tensor] | None = None,
        min_bytes: int = MIN_OFFLOAD_BYTES,
        stay_on: tuple[str, ...] = ("cpu", "meta"),
    ) -> None:
        self.params = {storage_key(p) for p in model.parameters()}
        self.to_host = to_host or self._cuda_to_host
        self.to_device = to_device or self._cuda_to_device
        self.min_bytes = min_bytes
        self.stay_on = stay_on  # device types whose tensors are already where offloading puts them
        self.moved = self.kept = 0  # bytes, for the log and the tests
        self._stream: Any = None

    def pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if (
            isinstance(t, nn.Parameter)
            or nbytes < self.min_bytes
            or t.device.type in self.stay_on
            or storage_key(t) in self.params
        ):
            self.kept += nbytes
            return ("kept", t)
        self.moved += nbytes
        return ("moved", self.to_host(t))

    def unpack(self, packed: Any) -> torch.Tensor:
        kind, value = packed
        return value if kind == "kept" else self.to_device(value)

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _cuda_to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any, torch.device]:
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done, t.device

    @staticmethod
    def _cuda_to_device(handle: tuple[torch.Tensor, Any, torch.device]) -> torch.Tensor:
        host, done, device = handle
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def offload_blocks(model: nn.Module, offloader: Offloader | None = None) -> list[Any]:
    """Offload what every block saves for backward (a checkpointed block saves its input):
    forward pre- and post-hooks open and close :class:`Offloader`'s hooks around each block, outside
    the checkpoint, so a backward recompute is not offloaded again. Returns the hook handles; on a
    CPU-only model (and no ``offloader`` given) nothing is registered and the log says why."""
    param = next(model.parameters(), None)
    if offloader is None and (param is None or param.device.type != "cuda"):
        log.warning(
            "trainer.offload_activations=true does nothing here: the activations already live in "
            "host memory (no CUDA device)."
        )
        return []
    off = offloader or Offloader(model)
    handles = []
    for block in blocks(model):
        state: dict[str, Any] = {}

        def enter(module: nn.Module, args: Any, state: dict = state) -> None:
            if torch.is_grad_enabled():
                state["ctx"] = off.hooks()
                state["ctx"].__enter__()

        def leave(module: nn.Module, args: Any, out: Any, state: dict = state) -> None:
            ctx = state.pop("ctx", None)
            if ctx is not None:
                ctx.__exit__(None, None, None)

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    return handles
