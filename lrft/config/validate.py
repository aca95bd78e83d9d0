"""Validate a composed ``lrft train`` config, once: values and cross-group combinations that a
schema's types cannot express, then the method's own checks (:mod:`lrft.methods.registry`).

Torch-free, except where ``model=hf`` must read the checkpoint's ``config.json``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrft.errors import UserError, did_you_mean, one_of
from lrft.schema import (
    COMPATIBLE,
    COMPILE_BACKENDS,
    COMPUTE_DTYPES,
    DATASET_KINDS,
    DROPOUT_KERNELS,
    GROUP_SCHEMAS,
    GROUPS,
    LR_SCHEDULERS,
    MEMORY_PLANS,
    MODEL_DTYPES,
    ON_NAN,
    OPTIMIZERS,
    PRECISIONS,
    QUANT_STORAGE,
    QUANT_TYPES,
    SHARDINGS,
    TASKS,
    TrainConfig,
    TrainerConfig,
)


def validate(cfg: DictConfig) -> None:
    """Check values and combinations that a schema's types cannot express."""
    if "model" not in cfg:  # eval/merge configs validate their own parts
        return
    _check_keys(cfg)
    m, d, t = cfg.model, cfg.dataset, cfg.trainer
    one_of("dataset.kind", d.kind, DATASET_KINDS)
    if m.name_or_path is None and m.from_config is None:
        raise UserError(f"model '{m.name}' has neither name_or_path nor from_config: set model.name_or_path.")
    open_task = OmegaConf.is_missing(m, "task") or m.task is None
    if open_task or (not list(m.target_modules) and m.name_or_path):
        from lrft.model.resolve import resolve_model_config  # transformers: only when the checkpoint decides

        resolve_model_config(cfg)  # model=hf: task, targets from the checkpoint (before any data encoding)
    one_of("model.task", m.task, TASKS)
    one_of("model.dtype", m.dtype, MODEL_DTYPES)
    one_of("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    if t.mixed_precision is not None:
        one_of("trainer.mixed_precision", t.mixed_precision, PRECISIONS)
    one_of("trainer.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
    one_of("trainer.on_nan", t.on_nan, ON_NAN)
    one_of("trainer.sharding", t.get("sharding", "none"), SHARDINGS)
    one_of("trainer.compile_backend", t.get("compile_backend", "inductor"), COMPILE_BACKENDS)
    one_of("trainer.dropout_kernel", t.get("dropout_kernel", "auto"), DROPOUT_KERNELS)
    if d.eval_holdout < 0:
        raise UserError(
            f"dataset.eval_holdout must be >= 0 (a fraction < 1 or a row count), got {d.eval_holdout}."
        )
    if (m.task, d.kind) not in COMPATIBLE:
        works = "; ".join(f"{a} model + {b} data ({how})" for (a, b), how in COMPATIBLE.items())
        raise UserError(
            f"model '{m.name}' ({m.task}) cannot train on dataset '{d.name}' ({d.kind}). "
            f"Combinations that work: {works}."
        )
    if d.get("packing") and m.task != "causal":
        raise UserError(
            f"dataset.packing=true needs a causal (decoder-only) model; model '{m.name}' is a {m.task} "
            "model: an encoder or encoder-decoder attends across a whole row, so packed examples would "
            "see each other. Set dataset.packing=false (trainer.group_by_length=true also cuts padding)."
        )
    for key in ("batch_size", "grad_accum"):
        if t[key] < 1:
            raise UserError(f"trainer.{key} must be >= 1, got {t[key]}.")
    if not 0.0 <= t.warmup_ratio <= 1.0:  # issue 24, finding 7: a ratio of 2 warmed up forever
        raise UserError(
            f"trainer.warmup_ratio is the share of the steps spent warming up, in [0, 1]; got "
            f"{t.warmup_ratio}. Use trainer.warmup_steps=N for a number of steps."
        )
    if t.warmup_steps < 0:
        raise UserError(f"trainer.warmup_steps must be >= 0, got {t.warmup_steps}.")
    check_trainer_counts(t)
    check_objective(cfg)
    check_memory_keys(t, cfg.get("memory"))
    if t.max_steps == 0 or t.max_steps < -1:
        raise UserError(
            f"trainer.max_steps={t.max_steps} would train nothing: set trainer.max_steps > 0, or -1 to "
            "train for trainer.epochs epochs."
        )
    if t.max_steps <= 0 and t.epochs <= 0:
        raise UserError("Set trainer.max_steps > 0 or trainer.epochs > 0.")
    check_report_to(t.report_to)
    check_quantization(cfg)
    if d.streaming and t.max_steps <= 0:
        raise UserError(
            "dataset.streaming=true reads the train rows lazily, so an epoch's length is unknown: "
            "set trainer.max_steps > 0."
        )
    if d.num_proc < 1:
        raise UserError(f"dataset.num_proc must be >= 1, got {d.num_proc}.")
    if cfg.optimizer.lr <= 0:
        raise UserError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}.")
    from lrft.methods.registry import validate_method

    validate_method(cfg)


def check_trainer_counts(t: Any) -> None:
    """Trainer keys that are a count or ``auto``."""
    workers = t.get("dataloader_workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"trainer.dataloader_workers must be auto or an integer >= 0, got {workers!r}.")
    chunk = t.get("loss_chunk", "auto")
    if chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise UserError(
            "trainer.loss_chunk must be auto (positions per chunk sized to the vocabulary), an int "
            f">= 1 (positions per chunk of logits) or 0 (the full logits), got {chunk!r}."
        )


# trainer.report_to: accelerate's tracker name -> (package to install, accelerate's availability check)
TRACKERS = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "mlflow": ("mlflow-skinny", "is_mlflow_available"),
}


def check_report_to(value: str | None) -> None:
    """A known tracker whose package is installed (accelerate would fail later, mid-setup)."""
    if value is None:
        return
    if value not in TRACKERS:
        raise UserError(
            f"trainer.report_to={value!r} is not valid (null: no tracker)."
            f"{did_you_mean(str(value), tuple(TRACKERS))}"
        )
    import accelerate.utils

    package, check = TRACKERS[value]
    if not getattr(accelerate.utils, check)():
        raise UserError(f"trainer.report_to={value} needs the {package} package: pip install {package}")


def _check_keys(cfg: DictConfig) -> None:
    """Keys added with ``+group.key=...`` bypass Hydra's struct check: hold them to the schema too."""
    from dataclasses import fields

    from lrft.methods.registry import method_spec

    schemas = dict(GROUP_SCHEMAS, trainer=TrainerConfig)
    schemas["method"] = method_spec(cfg.method.name).config
    for group, schema in schemas.items():
        valid = [f.name for f in fields(schema)]
        for key in cfg[group]:
            if key not in valid:
                raise UserError(f"Unknown config key '{group}.{key}'.{did_you_mean(str(key), valid)}")
    extra = set(cfg.keys()) - {f.name for f in fields(TrainConfig)}
    if extra:
        raise UserError(f"Unknown config key '{sorted(extra)[0]}'.{did_you_mean(sorted(extra)[0], GROUPS)}")


def check_quantization(root_cfg: Any) -> None:
    """Values a schema cannot check: the quantization type and dtype names."""
    q = root_cfg.quantization
    for key, value, valid in (
        ("name", q.name, QUANT_TYPES),
        ("compute_dtype", q.compute_dtype, COMPUTE_DTYPES),
        ("quant_storage", q.quant_storage, QUANT_STORAGE),
    ):
        if value not in valid:
            raise UserError(f"quantization.{key}={value!r} is not valid.{did_you_mean(str(value), valid)}")


def check_memory_keys(t: Any, memory: Any) -> None:
    """trainer.gradient_checkpointing, offload_activations, memory_plan and memory.budget_gb."""
    gc = t.get("gradient_checkpointing", False)
    if not (isinstance(gc, bool) or gc == "auto" or (isinstance(gc, int) and gc >= 0)):
        raise UserError(
            f"trainer.gradient_checkpointing={gc!r}: use false, true (every block), a number N >= 0 "
            "(N of the model's blocks, evenly spread) or auto (the fewest that fit memory.budget_gb)."
        )
    one_of("trainer.memory_plan", t.get("memory_plan", "none"), MEMORY_PLANS)
    budget = memory.get("budget_gb") if memory is not None else None
    if budget is not None and budget <= 0:
        raise UserError(f"memory.budget_gb must be > 0 (GiB per device), got {budget}.")


def check_objective(cfg: DictConfig) -> None:
    """A preference objective trains on preference pairs, and pairs need one (torch-free)."""
    from lrft.objectives.schemas import OBJECTIVES

    o, d = cfg.get("objective"), cfg.dataset
    name = "sft" if o is None else o.name
    one_of("objective.name", name, tuple(OBJECTIVES))
    paired = OBJECTIVES[name].paired
    if paired and d.kind != "preference":
        raise UserError(
            f"objective={name} learns from preference data, and dataset '{d.name}' is {d.kind} data. "
            "Use dataset=preference with a file of prompt/chosen/rejected rows (prompt/completion/"
            "label rows for objective=kto), or objective=sft."
        )
    if not paired and d.kind == "preference":
        raise UserError(
            "dataset=preference holds preference rows: train it with a preference "
            "objective: objective=dpo, ipo, orpo, simpo (pairs) or kto (labelled completions)."
        )
    if not paired:
        return
    if o.beta <= 0:
        raise UserError(f"objective.beta must be > 0, got {o.beta}.")
    if d.get("packing"):
        raise UserError(
            "dataset.packing=true with a preference objective: a pair's chosen and rejected rows are "
            "scored as whole sequences (not packed yet). Set dataset.packing=false; "
            "trainer.group_by_length=true also cuts padding."
        )
    if d.get("streaming") or d.get("mix"):
        raise UserError("preference data is read from files (dataset.data_files), not streamed or mixed yet.")
