"""LoRA-GA (https://arxiv.org/abs/2407.05000): adapters start along the full fine-tuning gradient.

The gradient G = ∂L/∂W of every adapted weight is averaged over ``init_batches`` training batches
(and across ranks), then randomized SVD G ≈ U S Vᵀ (q = 4r, 4 iterations). The paper's default
direction "ArB2r": A = V[:, :r]ᵀ, B = U[:, r:2r]; its "stable" scale multiplies both by
d_out^¼ / √γ. The base is offset by s·B·A so the output is unchanged, like PiSSA.

Memory: no weight gets a ``.grad``. A probe on each adapted layer's output takes G = gᵀx in
backward and adds it to that layer's float32 accumulator on the model's device (only targeted
layers have one). Probes keep their layer's input for backward, so with gradient checkpointing
available the estimate runs checkpointed: inputs are recomputed one decoder layer at a time
instead of all being held at once. Several processes split the calibration batches and sum.
A quantized base works the same way (G is w.r.t. the dequantized weight); its offset is applied
to the dequantized weight, which is then re-quantized, as the official code does.
"""

from __future__ import annotations

import sys
import time
from itertools import islice
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.methods.base import ApplyContext
from lrft.methods.layers import LowRankLinear
from lrft.methods.lora import Lora
from lrft.methods.registry import register_method
from lrft.methods.schemas import LORA_GA_DIRECTIONS, LORA_GA_SCALES, LoraGAConfig
from lrft.model.activations import blocks, checkpoint_blocks, checkpointing

DIRECTIONS, SCALES = LORA_GA_DIRECTIONS, LORA_GA_SCALES


class _Probe(torch.autograd.Function):
    """Identity on a layer's output whose backward adds gᵀx (the weight's gradient) to ``sink``."""

    @staticmethod
    def forward(ctx, out, x, anchor, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        ctx.sink(g2.t() @ x.reshape(-1, x.shape[-1]).float())  # (d, k), then freed
        return grad, None, None, None


def estimate_gradients(
    model: nn.Module, layers: dict[str, nn.Module], batches: Any, n_batches: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Summed ∂L/∂W (float32, (d, k)) of each layer in ``layers`` over up to ``n_batches`` batches,
    and how many batches were seen (the caller divides: across processes, by the global count)."""
    store = next(model.parameters()).device
    acc: dict[str, torch.Tensor] = {}
    anchor = torch.zeros((), requires_grad=True)  # the only leaf needing grad: backward reaches the probes

    def sink_for(name: str) -> Any:
        def sink(g: torch.Tensor) -> None:
            g = g.to(store)
            acc[name] = acc[name].add_(g) if name in acc else g

        return sink

    def hook_for(name: str) -> Any:
        sink = sink_for(name)
        return lambda mod, args, out: _Probe.apply(out, args[0].detach(), anchor, sink)

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    was_training, seen = model.training, 0
    checkpointed = checkpointing(model) or not hasattr(model, "supports_gradient_checkpointing")
    if not checkpointed and getattr(model, "supports_gradient_checkpointing", False):
        checkpoint_blocks(model, len(blocks(model)))
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # adapters too: no .grad may be left behind for the first step
    # the training loss's gradient, dropout included (seeded, so repeatable); train mode also keeps
    # bitsandbytes from repacking 4-bit weights for CPU inference, which would round their scales
    model.train()
    try:
        for batch in islice(batches, n_batches):
            model(**batch).loss.backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if not checkpointed:
            checkpoint_blocks(model, 0)
        model.train(was_training)
    return acc, seen


def logical_shape(base: nn.Module) -> tuple[int, int]:
    """(out, in) of a base linear layer: a bitsandbytes 4-bit weight is stored packed, (n/2, 1)."""
    return int(base.out_features), int(base.in_features)


def ga_factors(
    grad: torch.Tensor, r: int, scale: float, c: LoraGAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, k), B (d, r)) from the SVD of the averaged gradient (float32)."""
    q = min(4 * r, min(grad.shape))
    u, _, v = torch.svd_lowrank(grad, q=q, niter=c.svd_niter)
    vh = v.t()
    pick = {
        "ArB2r": (slice(0, r), slice(r, 2 * r)),
        "A2rBr": (slice(r, 2 * r), slice(0, r)),
        "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
    }[c.direction]
    a, b = vh[pick[0]], u[:, pick[1]]
    if c.init_scale == "stable":
        factor = grad.shape[0] ** 0.25 / c.stable_gamma**0.5
        a, b = a * factor, b * factor
    elif c.init_scale == "gd":
        a, b = a / scale, b / scale
    return a.contiguous(), b.contiguous()


@register_method("lora_ga", config=LoraGAConfig)
class LoraGA(Lora):
    cfg: LoraGAConfig
    init_computes = True  # gradient probes over the calibration batches, then an SVD per layer

    def init_layers(self, model: nn.Module, layers: dict[str, LowRankLinear], ctx: ApplyContext) -> None:
        if ctx.calibration is None:
            raise UserError(
                "LoRA-GA initialises from the gradient of training batches and none were given: "
                "run it through `lrft train`, or pass ApplyContext(calibration=...) to apply()."
            )
        c, start = self.cfg, time.perf_counter()
        acc = ctx.accelerator
        world = getattr(acc, "num_processes", 1) if acc is not None else 1
        rank = getattr(acc, "process_index", 0) if acc is not None else 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        bases = {n: layer.base_layer for n, layer in layers.items()}
        # refusals first, from the logical shapes every rank shares: a rank raising alone, after
        # its peers entered a collective, would hang them
        shapes = {n: logical_shape(b) for n, b in bases.items()}
        for name, shape in shapes.items():
            if 2 * c.r > min(shape):
                raise UserError(f"method.r={c.r}: LoRA-GA needs 2r <= {min(shape)} for layer {name}.")
        # each process probes its share of the init_batches (rank, rank + W, ...), then they sum
        mine = islice(ctx.calibration(), rank, None, world)
        share = len(range(rank, c.init_batches, world))
        grads, seen = estimate_gradients(model, bases, mine, share)
        if world > 1:
            seen = int(acc.reduce(torch.tensor(float(seen), device=acc.device), "sum").item())
        if seen == 0:
            raise UserError("LoRA-GA got no calibration batch: the training set is empty.")
        estimated = time.perf_counter()
        for name, layer in layers.items():
            # a rank without a calibration batch adds zeros of the logical (out, in) shape: a
            # packed 4-bit weight's own shape differs, and the all-reduce sizes must match
            grad = grads.pop(name) if name in grads else torch.zeros(shapes[name], dtype=torch.float32)
            grad = grad.to(layer.lora_A.device)
            if world > 1:
                grad = acc.reduce(grad, reduction="sum")
            grad /= seen
            layer.offset_base(*ga_factors(grad, c.r, layer.scale, c))
            del grad
        self.init_seconds = time.perf_counter() - start
        peak = (
            f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
        )
        if acc is None or getattr(acc, "is_main_process", True):
            print(
                f"LoRA-GA init: gradients of {len(layers)} layers over {seen} batches in "
                f"{estimated - start:.1f}s ({world} process(es)), SVD and offsets in "
                f"{time.perf_counter() - estimated:.1f}s{peak}",
                file=sys.stderr,
            )
