"""The one training loop. Every model, task and method goes through :func:`train`, top to bottom:

config -> tokenizer, data, model -> method.apply -> optimizer, schedule -> accelerate loop
(log, evaluate, checkpoint) -> final trainable state in the run folder.
"""

from __future__ import annotations

import json
import math
import platform
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

from lrft.checkpoint import save_checkpoint, save_final
from lrft.data import Collator, encode_rows, load_rows, num_labels
from lrft.evaluate import evaluate_model
from lrft.methods import get_method
from lrft.methods.base import ApplyContext
from lrft.models import count_parameters, load_model, load_tokenizer
from lrft.progress import TrainProgress

PACKAGES = ("lrft", "torch", "transformers", "accelerate", "datasets", "hydra-core", "bitsandbytes", "peft")


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Any, total: int) -> Any:
    from transformers import get_scheduler

    warmup = tcfg.warmup_steps or round(tcfg.warmup_ratio * total)
    kind = "constant_with_warmup" if tcfg.lr_scheduler == "constant" else tcfg.lr_scheduler
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def write_run_files(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """The resolved config, the overrides and package versions: enough to rerun and to compare."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "command": " ".join(["lrft", *sys.argv[1:]]) if sys.argv else None,
        "overrides": overrides,
        "versions": versions,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


@dataclass
class Run:
    """What :func:`train` leaves besides the run folder: its summary and the trained objects."""

    summary: dict[str, Any]
    model: nn.Module
    method: Any


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> Run:
    """Train one composed config (see :func:`lrft.config.compose`), writing the run folder.

    The summary holds steps, final train loss, final eval metrics and trainable/total parameters.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    run_dir = Path(run_dir)
    t, task = cfg.trainer, cfg.model.task
    AcceleratorState._reset_state()  # a second run in one process may use another precision
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        cpu=t.cpu,
        log_with=t.report_to,
        project_dir=str(run_dir),
    )
    main = accelerator.is_main_process
    set_seed(t.seed)
    if main:
        write_run_files(cfg, run_dir, overrides or [])

    # data first: a bad file should fail before a large model is loaded
    tokenizer = load_tokenizer(cfg.model)
    train_ex = encode_rows(load_rows(cfg.dataset, "train"), cfg.dataset, task, tokenizer)
    eval_ex = encode_rows(load_rows(cfg.dataset, "eval"), cfg.dataset, task, tokenizer)

    model = load_model(cfg.model, num_labels=num_labels(cfg.dataset), qcfg=cfg.quantization)
    if cfg.model.name_or_path is None and main:
        # a random-init base exists nowhere else: keep it, so the run can be reloaded and merged
        model.save_pretrained(run_dir / "base")
        tokenizer.save_pretrained(run_dir / "base")
    method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    collate = Collator(tokenizer, task)
    gen = torch.Generator().manual_seed(t.seed)
    loader = DataLoader(train_ex, batch_size=t.batch_size, shuffle=True, collate_fn=collate, generator=gen)

    def calibration() -> Iterator[dict[str, Any]]:
        device = next(model.parameters()).device
        for batch in DataLoader(train_ex, batch_size=t.batch_size, shuffle=False, collate_fn=collate):
            batch.pop("refs", None)
            yield {k: v.to(device) for k, v in batch.items()}

    ctx = ApplyContext(calibration=calibration, accelerator=accelerator)
    model = method.apply(model, defaults, ctx)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training: it only costs memory
    n_train, n_total = count_parameters(model)

    steps_per_epoch = max(1, len(loader) // t.grad_accum)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(steps_per_epoch * t.epochs))
    optimizer = method.build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, t, total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if t.report_to:
        accelerator.init_trackers("lrft", config=OmegaConf.to_container(cfg, resolve=True))

    def run_eval(step: int) -> dict[str, float]:
        bs = t.eval_batch_size or t.batch_size
        unwrapped = accelerator.unwrap_model(model)
        metrics = evaluate_model(unwrapped, tokenizer, eval_ex, cfg.dataset, task, bs, accelerator.device)
        log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    metrics_file = run_dir / "metrics.jsonl"

    def log(record: dict[str, Any]) -> None:
        if main:
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if t.report_to:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    progress = TrainProgress(total, enabled=main and t.progress)
    progress.note(f"{method.name} on {cfg.model.name}: {n_train:,} of {n_total:,} parameters train")
    step, window_loss, window_n, window_tokens = 0, 0.0, 0, 0
    last_loss, eval_metrics = float("nan"), {}
    tick = time.perf_counter()
    if t.eval_every and eval_ex:  # a starting point, so the curve in metrics.jsonl has its origin
        progress.note("step 0: " + _fmt(run_eval(0)))
    model.train()
    with progress:
        while step < total:
            for batch in loader:
                batch.pop("refs", None)  # eval-only references never reach the model
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach().float().item()
                window_n += 1
                window_tokens += int(batch["attention_mask"].sum())
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                lr = scheduler.get_last_lr()[0]
                if step % t.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - tick
                    last_loss = window_loss / window_n
                    record = {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": last_loss,
                        "lr": lr,
                        "tokens_per_s": window_tokens / elapsed,
                    }
                    log(record)
                    window_loss, window_n, window_tokens, tick = 0.0, 0, 0, time.perf_counter()
                    progress.update(step, loss=last_loss, lr=lr, tps=record["tokens_per_s"])
                else:
                    progress.update(step)
                if t.eval_every and step % t.eval_every == 0 and step < total and eval_ex:
                    eval_metrics = run_eval(step)
                    progress.note(f"step {step}: " + _fmt(eval_metrics))
                if t.save_every and step % t.save_every == 0 and step < total and main:
                    unwrapped = accelerator.unwrap_model(model)
                    save_checkpoint(
                        run_dir, step, method, unwrapped, optimizer, scheduler, t.keep_checkpoints
                    )
                if step >= total:
                    break
    if eval_ex:
        eval_metrics = run_eval(step)
    accelerator.wait_for_everyone()
    summary = {
        "steps": step,
        "train_loss": last_loss,
        "eval": eval_metrics,
        "trainable_params": n_train,
        "total_params": n_total,
        "run_dir": str(run_dir),
    }
    if main:
        save_final(run_dir, method, accelerator.unwrap_model(model), tokenizer, cfg)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        progress.summary(summary)
    accelerator.end_training()
    return Run(summary, accelerator.unwrap_model(model), method)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
