"""The engine a run trains on: the Accelerator, and what was decided about it from the config and
the launcher (precision, sharding). Kept in its own record so the validated config is never
rewritten: ``trainer.sharding=none`` under an accelerate FSDP launch stays ``none`` in the config,
and ``Engine.sharding`` says ``fsdp2``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lrft.errors import UserError
from lrft.run.topology import check_world, use_cpu
from lrft.schema import PRECISIONS, TRUTHY
from lrft.train import sharding


@dataclass(frozen=True)
class Engine:
    """``accelerator``: the run's one Accelerator. ``sharding``: ``none`` or ``fsdp2`` (lrft shards
    the model itself, :mod:`lrft.train.sharding`). ``precision``: the mixed precision in force."""

    accelerator: Any
    sharding: str
    precision: str

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp2"


def resolve_precision(requested: str | None) -> str:
    """``trainer.mixed_precision``: null follows the launcher (``accelerate launch
    --mixed_precision``, an accelerate config file: both set ACCELERATE_MIXED_PRECISION), else no.
    An explicit value that contradicts the launcher is refused: which one wins would be a guess."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION") or None
    if requested is None:
        return launcher or "no"
    if requested not in PRECISIONS:
        raise UserError(f"trainer.mixed_precision={requested!r} is not valid. Valid: null, no, fp16, bf16.")
    if launcher and launcher != requested:
        raise UserError(
            f"trainer.mixed_precision={requested} contradicts the launcher's mixed precision {launcher} "
            "(ACCELERATE_MIXED_PRECISION, set by `accelerate launch --mixed_precision` or its config "
            "file). Drop trainer.mixed_precision to use the launcher's, or launch with the same value."
        )
    return requested


DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported: this launch asks for it (accelerate config `distributed_type: "
    "DEEPSPEED`, ACCELERATE_USE_DEEPSPEED), and lrft has never trained under it, so nothing was "
    "trained. On a CPU-only machine accelerate would silently run such a config as plain DDP; "
    "on a real DeepSpeed engine its `gradient_clipping` is not lrft's trainer.max_grad_norm, and "
    "ZeRO-3 and resume were never run. Use instead: `accelerate launch --config_file "
    "configs/accelerate/fsdp.yaml` (or trainer.sharding=fsdp2) to shard weights, gradients and "
    "optimizer state like ZeRO-3, or `accelerate launch --config_file configs/accelerate/ddp.yaml` "
    "(or torchrun) for data parallel. See docs/distributed.md."
)


def refuse_deepspeed() -> None:
    """A DeepSpeed launch stops here, before the Accelerator and before any file is written.

    Tried on CPU (deepspeed 0.19.8, 2 processes, gloo): with ``cpu=True`` accelerate runs a
    DeepSpeed config as MULTI_CPU DDP without a word; with a real DeepSpeed engine ZeRO-2 equalled
    DDP only once the config's clipping matched trainer.max_grad_norm, after a minutes-long JIT
    build of DeepSpeed's shared-memory op. Not built to a tested standard, so refused."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in TRUTHY:
        raise UserError(DEEPSPEED_REFUSED)


def ddp_kwargs(kind: type) -> Any:
    """DDP without ``broadcast_buffers``: DDP would re-send every buffer from rank 0 before each
    forward, PiSSA's / LoRA-GA's ``lora_A0``/``lora_B0`` offsets included, which never change after
    init (every rank computes them alike). No model lrft trains has a buffer that changes in
    training: the families are BatchNorm-free transformers (LayerNorm / RMSNorm hold parameters,
    RoPE's ``inv_freq`` is constant), so nothing needs the broadcast."""
    return kind(broadcast_buffers=False)


def make_engine(cfg: DictConfig, run_dir: Path) -> Engine:
    """One Accelerator per run. Accumulation is done by the step (token-weighted over the window),
    so accelerate's own loss division by ``gradient_accumulation_steps`` stays off."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    t = cfg.trainer
    refuse_deepspeed()
    mode = sharding.requested(t)  # before the Accelerator: an FSDP launch is taken over here
    precision = resolve_precision(t.mixed_precision)
    AcceleratorState._reset_state()  # a second run in one process may use another precision
    acc = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=1,
        cpu=use_cpu(bool(t.cpu)),  # a torchrun launch on a CPU-only machine joins its gloo group
        log_with=t.report_to,
        project_dir=str(run_dir),
        kwargs_handlers=[ddp_kwargs(DistributedDataParallelKwargs)],
        # batches come pinned on CUDA (lrft.train.setup.loader_options): copy them without a sync,
        # the step's kernels queue behind the copy on the same stream
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    check_world(acc)  # before anything is written: never N one-process runs on one folder
    if acc.distributed_type.value == "DEEPSPEED":  # a DeepSpeed plugin reached accelerate otherwise
        raise UserError(DEEPSPEED_REFUSED)
    if precision == "fp16" and acc.scaler is None:
        # accelerate runs fp16 only on accelerators; torch's CPU autocast and GradScaler do the same
        # arithmetic, so fp16 runs (and is tested) on CPU through the same code path. Before
        # prepare: the prepared optimizer steps through this scaler.
        acc.scaler = torch.amp.GradScaler(acc.device.type)
        acc.native_amp = True  # lets accelerate unscale gradients before clipping
    return Engine(acc, mode, precision)
