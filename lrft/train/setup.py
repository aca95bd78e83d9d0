"""Everything before the first step, in the order a reader asks about it:

data -> model on its device -> method -> (sharding) -> loader -> optimizer, prepare -> schedule
length (measured after prepare) -> scheduler. The engine (accelerator, precision, sharding) comes
before, from :func:`lrft.train.engine.make_engine`.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrft.config import source
from lrft.data import Collator, num_labels
from lrft.data.packing import MASK_STYLES, PackedCollator, pack_examples
from lrft.data.pipeline import prepare_split
from lrft.data.sampling import LengthGroupedSampler
from lrft.methods import get_method
from lrft.methods.base import ApplyContext, Method
from lrft.methods.dropout_keys import WithIds
from lrft.methods.layers import key_layers, use_dropout_kernel
from lrft.model.activations import blocks, checkpoint_blocks, offload_blocks, resolve_count
from lrft.model.load import count_parameters, load_model, load_tokenizer, quantize
from lrft.model.meta import build_meta_model
from lrft.objectives import get_objective
from lrft.optim import build_optimizer
from lrft.run.topology import Topology
from lrft.train import materialize, sharding
from lrft.train.checkpoint import find_checkpoint, restore_trainable
from lrft.train.disk import base_write
from lrft.train.engine import Engine
from lrft.train.state import EpochSampler

PACKAGES = ("lrft", "torch", "transformers", "accelerate", "datasets", "hydra-core", "bitsandbytes", "peft")


def write_run_files(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    engine: Engine,
    topo: Topology | None = None,
    memory_plan: dict[str, Any] | None = None,
) -> None:
    """The resolved config, the overrides, package versions and how the run actually ran."""
    accelerator = engine.accelerator
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    composed = source.current()
    info = {
        "command": shlex.join(["lrft", "train", *composed.command]) if composed.command else None,
        "overrides": overrides,
        "config_dir": composed.user_dir,  # with config_name: what a resume composes from again
        "config_name": composed.name,
        "versions": versions,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mixed_precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "sharding": engine.sharding,  # an accelerate FSDP launch: fsdp2 whatever trainer.sharding says
        "device": str(accelerator.device),
        "topology": (topo or Topology(accelerator.num_processes)).as_dict(),
    }
    if memory_plan is not None:  # trainer.memory_plan=auto: what the planner chose (lrft.memory.choose)
        info["memory_plan"] = memory_plan
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


@dataclass
class Setup:
    """What the loop works with; built by :func:`setup`."""

    model: nn.Module
    method: Method
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: Any  # EpochSampler, LengthGroupedSampler, or None (streamed data)
    eval_examples: list[dict[str, Any]]
    total: int
    steps_per_epoch: int
    grad_accum: int
    trainable_params: int
    total_params: int
    resume_from: Path | None
    sharded: bool  # FSDP2: the model lrft sharded itself (not prepared by accelerate)
    objective: Any = None  # a preference objective (lrft.objectives), None for sft


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Any, total: int) -> Any:
    from transformers import get_scheduler

    warmup = tcfg.warmup_steps or round(tcfg.warmup_ratio * total)
    kind = "constant_with_warmup" if tcfg.lr_scheduler == "constant" else tcfg.lr_scheduler
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def setup(cfg: DictConfig, run_dir: Path, engine: Engine) -> Setup:
    """Data, model, loader, optimizer: everything the loop needs, in that order."""
    t, task, acc = cfg.trainer, cfg.model.task, engine.accelerator
    sharding.refuse(engine.sharding, cfg, acc)
    # data first: a bad file should fail before a large model is loaded. Tokenized once into a
    # memory-mapped cache (one process prepares it, the others wait, then all read it)
    tokenizer = load_tokenizer(cfg.model)
    train_ex = prepare_split(cfg.dataset, "train", task, tokenizer, accelerator=acc, seed=t.seed)
    eval_ex = prepare_split(cfg.dataset, "eval", task, tokenizer, accelerator=acc)
    streaming = not hasattr(train_ex, "__len__")
    objective = get_objective(cfg)
    if objective is not None and len(train_ex):  # pairs for dpo..simpo, labelled rows for kto
        objective.check_examples(train_ex[0])
    # with several processes a collective: every one must agree on the same step
    resume_from = find_checkpoint(run_dir, t.resume, acc) if t.resume else None
    method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))

    model, handover, full_state = _build_model(cfg, run_dir, engine, tokenizer, train_ex, method, resume_from)
    _for_training(model, t)
    if objective is not None and objective.reference:  # before any sharding: whole modules
        from lrft.objectives.preference import check_reference

        check_reference(model)
    n_train, n_total = count_parameters(model)  # before sharding: whole counts
    if engine.sharded:  # before compile and before the optimizer, which must hold the sharded parameters
        model = sharding.shard(model, acc)
        if handover is not None:
            materialize.fill(model, full_state, acc)  # rank 0's weights into every shard
            del full_state
    if objective is not None and getattr(objective.cfg, "precompute_ref", False) and not streaming:
        # after sharding: every rank then holds its shard (before it, a sharded run's model lives on
        # rank 0 alone), and the ranks run their reference forwards in lockstep
        from lrft.objectives.reference_cache import WithReference, reference_table

        table = reference_table(model, objective, train_ex, Collator(tokenizer, task), acc, run_dir)
        train_ex = WithReference(train_ex, table)
    if t.compile:
        # in place, after the method (its layers compile with the rest): the module, its parameter
        # names and so checkpoints stay those of the eager model
        model.compile(backend=t.compile_backend)
    loader, sampler = _loader(cfg, model, tokenizer, train_ex, streaming, acc.device)
    if acc.device.type == "cuda" and t.get("allow_tf32", True):
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores

    groups = method.param_groups(model, cfg.optimizer.weight_decay)
    optimizer = build_optimizer(groups, cfg.optimizer, in_backward=method.updates_in_backward)
    if engine.sharded:  # already distributed: accelerate would wrap it in DDP a second time
        optimizer, loader = acc.prepare(optimizer, loader)
    else:
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
    # measured on the sharded loader: N processes with the same global batch take as many steps as
    # one; a last, shorter accumulation window still makes a step
    steps_per_epoch = t.max_steps if streaming else max(1, math.ceil(len(loader) / t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(steps_per_epoch * t.epochs))
    scheduler = build_scheduler(optimizer, t, total)
    return Setup(
        model, method, tokenizer, optimizer, scheduler, loader, sampler, eval_ex,
        total, steps_per_epoch, t.grad_accum, n_train, n_total, resume_from, engine.sharded,
        objective,
    )  # fmt: skip


def _build_model(
    cfg: DictConfig,
    run_dir: Path,
    engine: Engine,
    tokenizer: Any,
    train_ex: Any,
    method: Method,
    resume_from: Path | None,
) -> tuple[nn.Module, materialize.Handover | None, Any]:
    """The model with the method applied. Sharded over several processes it is loaded once, by
    rank 0 (:mod:`lrft.train.materialize`): the others build it on the meta device and receive
    its layout; returned with the handover and rank 0's full state for the shards to fill."""
    acc = engine.accelerator
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    handover = materialize.Handover(acc) if engine.sharded and acc.num_processes > 1 else None
    if handover is not None and not handover.source:
        config, layout = handover.receive()
        model = method.apply(build_meta_model(cfg.model, config), defaults, ApplyContext(restoring=True))
        materialize.conform(model, layout)
        return model, handover, None
    try:
        model = _load_and_apply(cfg, run_dir, engine, tokenizer, train_ex, method, resume_from, defaults)
    except BaseException as err:
        if handover is not None:
            handover.fail(err)  # the other ranks raise it instead of waiting
        raise
    return model, handover, handover.send(model) if handover is not None else None


def _for_training(model: nn.Module, t: Any) -> None:
    use_dropout_kernel(model, t.get("dropout_kernel", "auto"))
    key_layers(model)  # ℓ of each layer's dropout mask, from its name (before any wrapping)
    # "auto" was replaced by a count before setup (lrft.memory.choose.apply_plan)
    checkpoint_blocks(model, resolve_count(t.gradient_checkpointing, len(blocks(model))))
    if t.get("offload_activations"):
        offload_blocks(model)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training: it only costs memory


def _loader(
    cfg: DictConfig, model: nn.Module, tokenizer: Any, train_ex: Any, streaming: bool, device: torch.device
) -> tuple[Any, Any]:
    """The training DataLoader and its sampler (None for streamed data)."""
    from torch.utils.data import DataLoader

    t = cfg.trainer
    rows, collate = train_ex, Collator(tokenizer, cfg.model.task)
    # map-style examples carry their index: the low-rank dropout masks follow the example, not
    # the split (lrft.methods.dropout_keys); streamed data has no stable index and is not keyed
    keyed = not streaming
    if cfg.dataset.packing:  # whole examples concatenated into rows of max_length (lrft.data.packing)
        rows = pack_examples(WithIds(train_ex) if keyed else train_ex, int(cfg.dataset.max_length))
        # compiled: one shape for every batch (nothing recompiles) and an explicit block mask, not
        # transformers' version-dependent detection of packed rows
        attn = getattr(model.config, "_attn_implementation", None)
        collate = PackedCollator(
            collate.pad_id,
            pad_to=int(cfg.dataset.max_length) if t.compile else None,
            mask=MASK_STYLES.get(attn) if t.compile else None,
        )
    if streaming:  # read as it comes: no sampler, resume skips the batches already seen
        return DataLoader(
            rows, batch_size=t.batch_size, collate_fn=collate, pin_memory=device.type == "cuda"
        ), None
    if t.group_by_length:
        sampler: Any = LengthGroupedSampler([len(r["input_ids"]) for r in rows], t.batch_size, t.seed)
    else:
        sampler = EpochSampler(len(rows), t.seed)
    if keyed and not cfg.dataset.packing:
        rows = WithIds(rows)
    # its own generator: creating an iterator then draws no number from the global RNG (dropout)
    gen = torch.Generator().manual_seed(t.seed)
    loader = DataLoader(rows, batch_size=t.batch_size, sampler=sampler, collate_fn=collate, generator=gen,
                        **loader_options(t, device))  # fmt: skip
    return loader, sampler


def loader_options(t: Any, device: torch.device) -> dict[str, Any]:
    """Workers and pinned memory for the training loader. The order of batches, and so the run, is
    the sampler's alone: workers only prepare them ahead (tests/test_loader_workers.py)."""
    import os

    workers = t.get("dataloader_workers", "auto")
    cuda = device.type == "cuda"
    if workers == "auto":
        workers = min(4, (os.cpu_count() or 2) // 2) if cuda else 0
    return {"num_workers": int(workers), "pin_memory": cuda, "persistent_workers": int(workers) > 0}


def _load_and_apply(
    cfg: DictConfig,
    run_dir: Path,
    engine: Engine,
    tokenizer: Any,
    train_ex: Any,
    method: Method,
    resume_from: Path | None,
    defaults: dict[str, list[str]],
) -> nn.Module:
    """The model loaded, on its device (unless sharded), with the method applied and, on resume,
    the checkpoint's trainable weights restored: whole tensors, before any sharding or wrapping."""
    from torch.utils.data import DataLoader

    t, accelerator = cfg.trainer, engine.accelerator
    random_init = cfg.model.name_or_path is None
    model = load_model(cfg.model, num_labels(cfg.dataset), qcfg=None if random_init else cfg.quantization)
    if random_init:
        if accelerator.is_main_process:  # the base exists nowhere else: keep it in full precision
            with base_write(run_dir, model):  # (to reload and merge the run)
                model.save_pretrained(run_dir / "base")
                tokenizer.save_pretrained(run_dir / "base")
        model = quantize(model, cfg.model, cfg.quantization)
    # on the device BEFORE the method: data-aware inits (PiSSA's SVD, LoRA-GA's gradient probes)
    # then run on the GPU, not the host. A model to shard may not fit one device whole: it stays
    # on the host, and fully_shard moves it over block by block (lrft.train.sharding), unless its
    # init computes and it fits rank 0's device for that while (lrft.train.materialize.init_device)
    init_on = None
    if not cfg.model.device_map and not engine.sharded:
        model = model.to(accelerator.device)
    elif engine.sharded and (init_on := materialize.init_device(method, model, accelerator.device)):
        model = model.to(init_on)
    method.refuse(accelerator, model)
    collate = Collator(tokenizer, cfg.model.task)  # calibration batches, as training's

    objective = get_objective(cfg)

    def calibration() -> Iterator[dict[str, Any]]:
        device = next(model.parameters()).device
        for batch in DataLoader(train_ex, batch_size=t.batch_size, shuffle=False, collate_fn=collate):
            batch.pop("refs", None)
            if objective is not None:  # preference rows: the completions to learn, as token loss
                batch = objective.calibration_batch(batch)
            yield {k: v.to(device) for k, v in batch.items()}

    # sharded: the model is still on the host, where a device collective (NCCL) cannot reduce, and
    # only rank 0 holds it: the data-aware init runs there on the whole calibration set
    split = None if engine.sharded else accelerator
    ctx = ApplyContext(calibration=calibration, accelerator=split, restoring=resume_from is not None)
    model = method.apply(model, defaults, ctx)
    if init_on is not None:  # back to the host: sharding and the hand-over go on as without it
        print(f"method={cfg.method.name}: initialized on rank 0's {init_on} (the whole model fits), "
              "then sharded from the host", file=sys.stderr)  # fmt: skip
        model = model.to("cpu")
    if resume_from is not None:
        restore_trainable(resume_from, cfg, method, model)
    return model
