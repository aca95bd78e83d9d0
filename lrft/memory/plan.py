"""Plan a run's memory without its weights: the model is built on the META device from its config.

The real model class, the real method (``apply`` injects the layers a run gets) and a real
forward and backward pass run on meta (:mod:`lrft.model.meta`) at no cost for any size; what they
would allocate is counted exactly, not estimated from formulas:

- activations: :func:`lrft.memory.measure.activation_profile` records every tensor autograd keeps, by
  storage and by layer, as the CPU measurement does (tests check that both agree);
- the step's peak: :class:`lrft.memory.measure.LiveBytes` follows every tensor a forward and backward
  allocate until it is freed (activations, gradients, transients), with and without gradient
  checkpointing (tests check it against the same count on CPU);
- weights, gradients: the parameters of the adapted model, by dtype and ``requires_grad``;
- optimizer state: the optimizer the method builds (its parameter groups) with each optimizer's
  state layout (AdamW, SGD momentum, bitsandbytes 8-bit AdamW, GaLore's projected moments).

bitsandbytes cannot run on meta, so a quantized base runs with its compute-dtype shapes and its
storage is counted analytically (:mod:`lrft.memory.state`, with the optimizer's state). int8
matmuls keep their input outside ``save_for_backward``; a hook adds it. A preference objective's
step (2 rows a pair or 1 row plus a KL row, the reference forward, KTO's KL pass, log-probs in
chunks of logits) is its own code run on meta (:mod:`lrft.memory.preference`). Not modelled: the
CUDA context, allocator rounding and fragmentation, kernel workspaces, the optimizer step's
temporaries, autocast's casts of a float32 model, padding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrft.errors import UserError
from lrft.memory.measure import ActivationProfile, LiveBytes, activation_profile
from lrft.memory.on_meta import meta_forward
from lrft.memory.preference import (
    ReferenceParts,
    ReferencePhase,
    pair_batch,
    pair_fields,
    pair_loss,
    pair_step,
)
from lrft.memory.state import (
    dtype_name,
    optimizer_kind,
    optimizer_state_bytes,
    quantized_bytes,
    quantized_linears,
)
from lrft.model.activations import Offloader, blocks, checkpoint_blocks, offload_blocks, resolve_count
from lrft.model.loss import loss_sum
from lrft.model.meta import GLUE_TARGET_TOKENS, build_meta_model, resolve_config
from lrft.optim import build_optimizer


@dataclass
class Plan:
    """One configuration's memory, in bytes.

    ``activations``: what autograd keeps for backward, split by layer (no checkpointing) and as
    checkpointing would keep it. ``peak``: the most that forward and backward hold at once beyond
    weights and optimizer state (activations, the gradients backward writes, transients), from a
    simulated step, without and with every block checkpointed. ``plain_peak``: without
    checkpointing, the loss from the full logits (``trainer.loss_chunk=0``; causal LMs whose
    loss is chunked, else None). ``offload_peak``: every block checkpointed and offloaded
    (``trainer.offload_activations=true``, else None).

    A preference objective: ``batch_size`` counts pairs (``rows_per_example`` = 2: chosen +
    rejected rows) or labelled examples (1 row, plus ``kl_rows`` = 1 mismatched KL row: KTO);
    ``logits_f32`` is the float32 logits ``sequence_logps`` holds at once: ``logits_positions``
    positions x V (one chunk of ``trainer.loss_chunk``; every position with loss_chunk=0);
    ``reference`` splits each peak into its phases (the KL pass, training, the no-grad reference
    forward; see :class:`lrft.memory.preference.ReferenceParts`), ``reference_refused`` says why
    lrft refuses a reference that would need a copy of ``reference_copy`` bytes (not in the
    totals: none is made).
    """

    label: str
    batch_size: int
    seq_len: int
    params_total: int
    params_trainable: int
    weights: dict[str, int]
    gradients: int
    optimizer: int
    optimizer_name: str
    activations: ActivationProfile
    peak: dict[bool, int]
    notes: list[str] = field(default_factory=list)
    blocks: int = 0  # the repeated blocks checkpointing can recompute (decoder layers)
    plain_peak: int | None = None
    offload_peak: int | None = None
    choice: Any = None  # budget: the fastest plan that fits (lrft.memory.choose.Choice)
    objective: str = "sft"
    rows_per_example: int = 1
    kl_rows: int = 0
    logits_positions: int = 0
    logits_f32: int = 0
    reference: dict[bool, ReferenceParts] | None = None
    reference_refused: str | None = None
    reference_copy: int = 0

    @property
    def resident(self) -> int:
        """Held through the whole step: weights and optimizer state."""
        return sum(self.weights.values()) + self.optimizer

    def total(self, checkpointing: bool) -> int:
        return self.resident + max(self.peak[checkpointing], self.gradients)


class Planner:
    """Builds one composed config's model on meta once; plans it at any micro-batch size."""

    def __init__(self, cfg: DictConfig) -> None:
        from lrft.data.load import num_labels

        self.cfg = cfg
        mcfg, qcfg = cfg.model, cfg.quantization
        self.num_labels = num_labels(cfg.dataset)
        self.hf_config, self.config_source = resolve_config(mcfg, self.num_labels)
        self.notes: list[str] = []
        self.model = self._build_and_apply()
        self.pairs = pair_step(cfg, self.model)  # None: sft; pairs or KTO's labelled rows
        self.reference_parts: dict[tuple[int, bool | int, bool], ReferenceParts] = {}
        if self.pairs is not None:
            self.notes.append(self.pairs.note)
        linears = quantized_linears(self.model, mcfg, qcfg)
        self.quantized = {id(m.weight): m for m in linears.values()}
        self.int8 = [m for m in linears.values() if qcfg.name == "int8"]
        groups = self.method.param_groups(self.model, cfg.optimizer.weight_decay)
        in_backward = self.method.updates_in_backward
        self.optimizer = build_optimizer(groups, cfg.optimizer, in_backward=in_backward)
        if cfg.trainer.mixed_precision not in (None, "no") and self.model.dtype == torch.float32:
            self.notes.append(
                f"trainer.mixed_precision={cfg.trainer.mixed_precision} on a float32 model: activations "
                "are planned in float32; autocast's half-precision copies are not modelled."
            )

    def _build_and_apply(self) -> nn.Module:
        from lrft.methods.base import ApplyContext
        from lrft.methods.registry import get_method

        cfg = self.cfg
        self.method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
        defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
        model = build_meta_model(cfg.model, self.hf_config)
        self.base_params = {id(p) for p in model.parameters()}  # the rest the method adds
        try:  # the method's own init where it runs on meta (PiSSA's SVD does)
            return self.method.apply(model, defaults, ApplyContext())
        except (UserError, NotImplementedError, RuntimeError) as err:
            # data-dependent inits (LoRA-GA's gradients) cannot: same layers, same shapes, no init
            reason = str(err).splitlines()[0][:90]
            self.notes.append(
                f"init skipped on meta ({reason}); layers as a restored run's. An init that moves "
                "the base also keeps B₀, A₀ (the adapters' size again)."
            )
            model = build_meta_model(cfg.model, self.hf_config)
            self.base_params = {id(p) for p in model.parameters()}
            return self.method.apply(model, defaults, ApplyContext(restoring=True))

    def _batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        cfg, task = self.cfg, self.cfg.model.task
        length = int(cfg.dataset.max_length)
        if self.pairs is not None:
            return pair_batch(self.pairs, batch_size, length)
        ids = torch.zeros(batch_size, length, dtype=torch.long, device="meta")
        if task == "causal":
            return {"input_ids": ids, "labels": ids}
        if task == "classification":
            dtype = torch.float32 if self.num_labels == 1 else torch.long  # STS-B regresses
            return {"input_ids": ids, "labels": torch.zeros(batch_size, dtype=dtype, device="meta")}
        target = cfg.memory.target_length
        if target is None:
            target = length if cfg.dataset.kind == "instruction" else GLUE_TARGET_TOKENS
        labels = torch.zeros(batch_size, int(target), dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": labels}

    def _int8_inputs(self, keep: Any) -> list[Any]:
        """bitsandbytes' int8 matmul keeps its input as a ``ctx`` attribute: hand it to ``keep``."""

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if torch.is_grad_enabled() and args[0].requires_grad:
                keep(args[0], out)

        return [m.register_forward_hook(hook) for m in self.int8]

    @property
    def chunk(self) -> int | str:
        return self.cfg.trainer.get("loss_chunk", 0)

    @property
    def n_blocks(self) -> int:
        return len(blocks(self.model))

    def loss(self, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """The loss as the training step computes it: a causal LM's in chunks of logits, a
        preference objective's by its own ``prepare`` and ``loss_terms`` (chunked log-probs,
        reference forward)."""
        if self.pairs is not None:
            return pair_loss(self.pairs, self.model, batch, chunk)
        if self.cfg.model.task == "causal":
            return loss_sum(self.model, batch, "causal", chunk=self.chunk if chunk is None else chunk)
        return self.model(**batch).loss

    def activations(self, batch_size: int) -> ActivationProfile:
        batch = self._batch(batch_size)
        with meta_forward():
            return activation_profile(
                self.model,
                lambda: self.loss(batch),
                lambda rec: self._int8_inputs(lambda x, out: rec.add(x)),
            )

    def step_peak(
        self, batch_size: int, checkpointing: bool | int, offload: bool = False, chunk: int | None = None
    ) -> int:
        """Peak bytes of one forward + backward on meta (see :class:`lrft.memory.measure.LiveBytes`)
        with ``checkpointing`` (false | true | N) of the blocks recomputed, their saved activations
        offloaded to the host or not, the loss in chunks of ``chunk`` positions (None: the config's)."""
        model, batch = self.model, self._batch(batch_size)

        def keep(x: torch.Tensor, out: torch.Tensor) -> None:
            # as bitsandbytes' ctx does: the input lives as long as the matmul's autograd node
            out.grad_fn.metadata["lrft_int8_input"] = x

        handles = self._int8_inputs(keep)
        if self.method.updates_in_backward and not self.optimizer.state:
            # layer-wise updates run inside backward: create their state first, as after step one,
            # so the peak counts the update's transients but not the state (its own row)
            with meta_forward():
                self.loss(self._batch(1)).backward()
        checkpoint_blocks(model, resolve_count(checkpointing, self.n_blocks))
        if offload:  # a host copy keeps only the shape: the activation stops counting here
            off = Offloader(model, to_host=_shape_of, to_device=_empty_from, min_bytes=0, stay_on=())
            handles += offload_blocks(model, off)
        try:
            objective = self.pairs.objective if self.pairs is not None else None
            with meta_forward(), LiveBytes(model) as live, ReferencePhase(live, objective) as phase:
                self.loss(batch, chunk).backward()
        finally:
            checkpoint_blocks(model, 0)
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.grad = None
        # the reference forward's transient sits on what the training forward holds (0 without one)
        if chunk is None:  # the config's loss_chunk: the split the table shows
            self.reference_parts[(batch_size, checkpointing, offload)] = phase.parts
        return phase.parts.peak

    def weights(self) -> dict[str, int]:
        q = self.cfg.quantization
        out: dict[str, int] = defaultdict(int)
        for p in self.model.parameters():
            if id(p) in self.quantized:
                out[f"base frozen {q.name} (+ scales)"] += quantized_bytes(q.name, p, q.double_quant)
            else:
                role = "base" if id(p) in self.base_params else "adapter"
                state = "trainable" if p.requires_grad else "frozen"
                out[f"{role} {state} {dtype_name(p.dtype)}"] += p.numel() * p.element_size()
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        if buffers:
            out["buffers"] += buffers
        return dict(out)

    def largest_block(self) -> int:
        """Bytes of the largest repeated block (a decoder layer): what FSDP / ZeRO-3 gather at once."""
        blocks: dict[str, int] = {}
        for name, p in self.model.named_parameters():
            parts = name.split(".")
            cut = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            key = ".".join(parts[: cut + 1]) if cut is not None else name
            blocks[key] = blocks.get(key, 0) + p.numel() * p.element_size()
        return max(blocks.values(), default=0)

    def gradients(self) -> int:
        sizes = [p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad]
        if self.method.updates_in_backward:
            # layer-wise updates free each gradient inside backward: one exists at a time
            self.notes.append("layer-wise updates: one gradient exists at a time.")
            return max(sizes, default=0)
        return sum(sizes)

    def plan(self, batch_size: int | None = None) -> Plan:
        batch_size = batch_size or int(self.cfg.trainer.batch_size)
        params = list(self.model.parameters())
        gradients = self.gradients()
        # the full-logits row: wherever a chunk setting applies (the token loss, sequence_logps)
        chunked = self.cfg.model.task == "causal" and self.chunk != 0
        offload = bool(self.cfg.trainer.get("offload_activations"))
        peak = {gc: self.step_peak(batch_size, gc) for gc in (False, True)}
        length = int(self.cfg.dataset.max_length)
        pairs = pair_fields(self.pairs, self.reference_parts, batch_size, length, self.model)
        return Plan(
            label=str(self.cfg.method.name),
            batch_size=batch_size,
            seq_len=int(self.cfg.dataset.max_length),
            params_total=sum(p.numel() for p in params),
            params_trainable=sum(p.numel() for p in params if p.requires_grad),
            weights=self.weights(),
            gradients=gradients,
            optimizer=optimizer_state_bytes(self.optimizer),
            optimizer_name=optimizer_kind(self.optimizer),
            activations=self.activations(batch_size),
            peak=peak,
            notes=list(dict.fromkeys(self.notes)),
            blocks=self.n_blocks,
            plain_peak=self.step_peak(batch_size, False, chunk=0) if chunked else None,
            offload_peak=self.step_peak(batch_size, True, offload=True) if offload else None,
            **pairs,
        )

    def max_batch(self, plan: Plan, budget: int, checkpointing: bool, limit: int = 1 << 16) -> int:
        """The largest micro-batch (up to ``limit``) whose total fits ``budget`` bytes (0: none)."""
        cache: dict[int, bool] = {}

        def fits(b: int) -> bool:
            if b not in cache:
                peak = self.step_peak(b, checkpointing)
                cache[b] = plan.resident + max(peak, plan.gradients) <= budget
            return cache[b]

        if not fits(1):
            return 0
        # the step grows about linearly with the batch: aim from 1 and 2, then bisect to be exact
        t1, t2 = (self.step_peak(b, checkpointing) for b in (1, 2))
        room = budget - plan.resident - t1
        b = min(limit, 1 + room // (t2 - t1)) if t2 > t1 else limit
        lo, hi = (b, None) if fits(b) else (1, b)
        if hi is None:  # grow until it does not fit
            step = 1
            while lo < limit and fits(min(lo + step, limit)):
                lo, step = min(lo + step, limit), step * 2
            hi = min(lo + step, limit + 1)
            if lo == limit:
                return limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def _shape_of(t: torch.Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return t.shape, t.dtype, t.device


def _empty_from(handle: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    shape, dtype, device = handle
    return torch.empty(shape, dtype=dtype, device=device)
