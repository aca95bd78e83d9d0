"""Sharded runs hold the model once: rank 0 loads it, every other rank builds it on the meta device.

Without this, every process of an FSDP2 run would load the whole model into host memory before
``fully_shard`` splits it: W copies per node (8 x 140 GB for a bf16 70B). Instead:

1. rank 0 loads the model and applies the method as a one-process run would (data-aware inits,
   resume's trainable weights included); the other ranks wait;
2. rank 0 sends its transformers config and the name, shape and dtype of every tensor it holds;
   each other rank builds the same model on the meta device (no memory), applies the method's
   structure only (``ApplyContext(restoring=True)``) and conforms to that layout (buffers an init
   added, such as PiSSA's B₀/A₀; a dtype the load resolved differently). Anything else that
   differs is an error, not a silent mismatch;
3. every rank shards (``fully_shard``); the meta ranks allocate their shards (``to_empty``) and
   rank 0 broadcasts the weights tensor by tensor
   (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``), each rank keeping
   its own shard; buffers (RoPE's ``inv_freq`` is not in the state dict) are broadcast whole.

Step 1's data-aware init (PiSSA's SVDs, LoRA-GA's probes: ``Method.init_computes``) runs on rank
0's GPU when the whole model fits there with room to spare (:func:`init_device`), then the model
goes back to the host and the steps above go on unchanged: 224 SVDs of a 7B model take minutes
on a host and seconds on a GPU. Otherwise it runs on the host. Loading can take long too, so the
hand-over runs
on a gloo group of its own with a long timeout; a failure on rank 0 is sent to the others, which
raise it instead of waiting. Tested: ``tests/test_fsdp2.py`` (2 processes equal 1; resume).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError

HANDOVER_TIMEOUT = timedelta(hours=6)  # rank 0's load + init while the others wait

Layout = dict[str, tuple[str, tuple[int, ...], torch.dtype]]  # name -> (kind, shape, dtype)


def init_device(method: Any, model: nn.Module, device: torch.device) -> torch.device | None:
    """Where rank 0 of a sharded run initializes ``method``: ``device`` (a GPU) when the method's
    init computes on the weights and the whole model takes at most 2/3 of the device's free memory
    (the rest for the SVD workspace, or LoRA-GA's probe activations); else None (the host)."""
    if not getattr(method, "init_computes", False) or device.type != "cuda":
        return None
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    free, _total = torch.cuda.mem_get_info(device)
    return device if size * 1.5 <= free else None


class Handover:
    """The rank-0-to-the-rest channel of one sharded setup (a collective to create)."""

    def __init__(self, accelerator: Any) -> None:
        import torch.distributed as dist

        self.rank = accelerator.process_index
        self.source = self.rank == 0
        self.group = dist.new_group(backend="gloo", timeout=HANDOVER_TIMEOUT)

    def _broadcast(self, payload: Any) -> Any:
        import torch.distributed as dist

        box = [payload]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def send(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Rank 0: config and layout out; returns the full state dict to broadcast after sharding
        (references to the host tensors, no copy)."""
        self._broadcast(("ok", model.config, layout(model)))
        return model.state_dict()

    def fail(self, err: BaseException) -> None:
        """Rank 0 failed before sending: tell the others (they raise), then rank 0 re-raises."""
        self._broadcast(("error", f"{type(err).__name__}: {err}", isinstance(err, UserError)))

    def receive(self) -> tuple[Any, Layout]:
        status, *rest = self._broadcast(None)
        if status == "error":
            message, user = rest
            raise (UserError if user else RuntimeError)(f"rank 0 failed while loading the model: {message}")
        config, lay = rest
        return config, lay


def layout(model: nn.Module) -> Layout:
    """Every tensor's (kind, shape, dtype); kind: param, buffer, or transient (a buffer outside the
    state dict, such as RoPE's inv_freq)."""
    out: Layout = {n: ("param", tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    saved = set(model.state_dict())
    for n, b in model.named_buffers():
        out[n] = ("buffer" if n in saved else "transient", tuple(b.shape), b.dtype)
    return out


def conform(model: nn.Module, want: Layout) -> None:
    """Make the meta model hold exactly rank 0's tensors: add missing buffers, take rank 0's dtypes;
    a missing parameter or a shape that differs means the two builds disagree (an error)."""
    have = layout(model)
    wrong = [n for n in have if n not in want]
    wrong += [n for n, (kind, shape, _) in want.items() if n in have and have[n][:2] != (kind, shape)]
    wrong += [n for n, (kind, _, _) in want.items() if n not in have and kind == "param"]
    if wrong:
        raise RuntimeError(f"the meta-built model differs from rank 0's at: {sorted(wrong)[:8]}")
    for name, (kind, shape, dtype) in want.items():
        if name in have and have[name][2] == dtype:
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        empty = torch.empty(shape, dtype=dtype, device="meta")
        if kind == "param":
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(empty, requires_grad=old.requires_grad)
        else:
            module.register_buffer(leaf, empty, persistent=kind == "buffer")


def fill(model: nn.Module, full: dict[str, torch.Tensor] | None, accelerator: Any) -> None:
    """After ``fully_shard`` on every rank: rank 0's weights into every rank's shards (a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if full is None:  # a meta rank: allocate its shards and buffers on the device first
        model.to_empty(device=accelerator.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full or {}, options=options)
    # buffers whole (RoPE's inv_freq is non-persistent, so not in the state dict); by name: a
    # buffer conform() added sits elsewhere in the registration order than on rank 0
    with torch.no_grad():
        for _, buf in sorted(model.named_buffers(), key=lambda item: item[0]):
            dist.broadcast(buf, src=0)
