"""The one training loop. Every model, task and method goes through :func:`train`, top to bottom:

config -> tokenizer, data, model -> method.apply -> optimizer, schedule -> accelerate loop
(log, evaluate, checkpoint) -> final trainable state in the run folder.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrft import faults
from lrft.checkpoint import save_final
from lrft.data import Collator, encode_rows, load_rows, num_labels
from lrft.errors import Interrupted, UserError
from lrft.evaluate import evaluate_model
from lrft.guards import UntrainedWatch, check_gradients, nan_message
from lrft.methods import get_method
from lrft.methods.base import ApplyContext
from lrft.models import count_parameters, load_model, load_tokenizer, quantize
from lrft.progress import TrainProgress
from lrft.resume import (
    Position,
    capture_rng,
    find_checkpoint,
    gather_trainable,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    truncate_metrics,
)

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


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): resume can replay any epoch's order exactly.

    Not named ``set_epoch`` on purpose: accelerate calls that with its own per-loader iteration
    count, which restarts at 0 for the loader that skips the batches already done.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A preempted job gets SIGTERM: treat it like Ctrl-C, so it saves and exits cleanly."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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

    random_init = cfg.model.name_or_path is None
    model = load_model(cfg.model, num_labels(cfg.dataset), qcfg=None if random_init else cfg.quantization)
    if random_init:
        if main:  # the base exists nowhere else: keep it in full precision, to reload and merge the run
            model.save_pretrained(run_dir / "base")
            tokenizer.save_pretrained(run_dir / "base")
        model = quantize(model, cfg.model, cfg.quantization)
    method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    collate = Collator(tokenizer, task)
    sampler = EpochSampler(len(train_ex), t.seed)
    # its own generator: creating an iterator then draws no number from the global RNG (dropout)
    gen = torch.Generator().manual_seed(t.seed)
    loader = DataLoader(train_ex, batch_size=t.batch_size, sampler=sampler, collate_fn=collate, generator=gen)

    def calibration() -> Iterator[dict[str, Any]]:
        device = next(model.parameters()).device
        for batch in DataLoader(train_ex, batch_size=t.batch_size, shuffle=False, collate_fn=collate):
            batch.pop("refs", None)
            yield {k: v.to(device) for k, v in batch.items()}

    resuming = bool(t.resume) and find_checkpoint(run_dir, t.resume) is not None
    ctx = ApplyContext(calibration=calibration, accelerator=accelerator, restoring=resuming)
    model = method.apply(model, defaults, ctx)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training: it only costs memory
    n_train, n_total = count_parameters(model)

    # accelerate steps the optimizer at the end of every epoch, even mid-window
    steps_per_epoch = max(1, math.ceil(len(loader) / t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(steps_per_epoch * t.epochs))
    optimizer = method.build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, t, total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if t.report_to:
        accelerator.init_trackers("lrft", config=_flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
    metrics_file = run_dir / "metrics.jsonl"
    progress = TrainProgress(total, enabled=main and t.progress)

    pos = Position(world_size=accelerator.num_processes)
    last_ckpt: str | None = None
    if resuming:
        ckpt = find_checkpoint(run_dir, t.resume)
        unwrapped = accelerator.unwrap_model(model)
        pos, rng = load_checkpoint(ckpt, accelerator, cfg, method, unwrapped, optimizer, scheduler)
        pos.world_size = accelerator.num_processes
        if main:
            truncate_metrics(metrics_file, pos.step)
        restore_rng(rng)  # last: nothing after this may draw random numbers before the loop
        last_ckpt = str(ckpt)
        progress.note(
            f"resumed from {ckpt} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch})"
        )
    elif t.resume:
        progress.note(f"trainer.resume={t.resume}: no checkpoint in {run_dir}, starting from scratch")

    def log(record: dict[str, Any]) -> None:
        if main:
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if t.report_to:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def run_eval(step: int) -> dict[str, float]:
        bs = t.eval_batch_size or t.batch_size
        unwrapped = accelerator.unwrap_model(model)
        metrics = evaluate_model(unwrapped, tokenizer, eval_ex, cfg.dataset, task, bs, accelerator.device)
        log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    def checkpoint(at: Position, rng: dict[str, Any]) -> str:
        path = save_checkpoint(accelerator, run_dir, at, rng, cfg, method, model, optimizer, scheduler)
        return str(path)

    progress.note(f"{method.name} on {cfg.model.name}: {n_train:,} of {n_total:,} parameters train")
    # layer-wise GaLore updates each weight inside backward and frees its gradient there: the
    # gradient guard and clipping have nothing to look at (its own checks run in the hooks)
    in_backward = getattr(getattr(optimizer, "optimizer", optimizer), "updates_in_backward", False)
    watch = UntrainedWatch(accelerator.unwrap_model(model), t.untrained_warn_steps)
    window_loss, window_n, window_tokens, window_bad, skipped = 0.0, 0, 0, False, 0
    last_loss, eval_metrics = float("nan"), {}
    if t.eval_every and eval_ex and pos.step == 0:  # the curve's origin in metrics.jsonl
        progress.note("step 0: " + _fmt(run_eval(0)))
    snapshot = (copy(pos), capture_rng())  # the state of the last completed step
    tick = time.perf_counter()
    model.train()
    try:
        with progress, sigterm_as_interrupt():
            while pos.step < total:
                sampler.use_epoch(pos.epoch)
                epoch_loader = (
                    accelerator.skip_first_batches(loader, pos.batch_in_epoch)
                    if pos.batch_in_epoch
                    else loader
                )
                for batch in epoch_loader:
                    pos.batch_in_epoch += 1
                    batch.pop("refs", None)  # eval-only references never reach the model
                    with accelerator.accumulate(model):
                        loss = model(**batch).loss
                        if torch.isfinite(loss):
                            accelerator.backward(loss)
                        else:  # never let one bad batch poison the accumulated gradients
                            window_bad = True
                    window_loss += loss.detach().float().item()
                    window_n += 1
                    window_tokens += int(batch["attention_mask"].sum())
                    if not accelerator.sync_gradients:
                        continue
                    if pos.step == 0 and not window_bad and not in_backward:
                        check_gradients(accelerator.unwrap_model(model))
                    if t.max_grad_norm > 0 and not window_bad and not in_backward:
                        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                        window_bad = norm is not None and not torch.isfinite(torch.as_tensor(norm))
                    if window_bad:
                        if t.on_nan == "stop":
                            raise UserError(nan_message(pos.step + 1, window_loss / window_n, last_ckpt))
                        skipped += 1
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    pos.step += 1
                    step, lr = pos.step, scheduler.get_last_lr()[0]
                    if step % t.log_every == 0 or step == total:
                        elapsed = time.perf_counter() - tick
                        # every rank's mean loss and token count, not only rank 0's
                        local = [window_loss / window_n, window_tokens]
                        stats = torch.tensor(local, device=accelerator.device)
                        stats = accelerator.reduce(stats, "sum")
                        last_loss = stats[0].item() / accelerator.num_processes
                        record = {
                            "step": step,
                            "epoch": round(step / steps_per_epoch, 4),
                            "loss": last_loss,
                            "lr": lr,
                            "tokens_per_s": stats[1].item() / elapsed,
                        }
                        if skipped:
                            record["skipped_steps"] = skipped
                        log(record)
                        window_loss, window_n, window_tokens, tick = 0.0, 0, 0, time.perf_counter()
                        progress.update(step, loss=last_loss, lr=lr, tps=record["tokens_per_s"])
                    else:
                        progress.update(step)
                    window_bad = False
                    watch.check(step)
                    snapshot = (copy(pos), capture_rng())
                    if t.eval_every and step % t.eval_every == 0 and step < total and eval_ex:
                        eval_metrics = run_eval(step)
                        progress.note(f"step {step}: " + _fmt(eval_metrics))
                    if t.save_every and step % t.save_every == 0 and step < total:
                        last_ckpt = checkpoint(pos, snapshot[1])
                    faults.maybe("kill_at_step", step)
                    faults.maybe("interrupt_at_step", step)
                    if step >= total:
                        break
                else:
                    pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    except KeyboardInterrupt:
        saved = checkpoint(*snapshot) if t.save_on_interrupt and snapshot[0].step > 0 else None
        hint = (
            f"saved {saved}; resume with output_dir={run_dir} trainer.resume=auto"
            if saved
            else "nothing saved"
        )
        raise Interrupted(f"interrupted at step {snapshot[0].step}: {hint}") from None
    if eval_ex:
        eval_metrics = run_eval(pos.step)
    accelerator.wait_for_everyone()
    final_state = gather_trainable(accelerator, model, method)  # collective under FSDP / ZeRO-3
    summary = {
        "steps": pos.step,
        "train_loss": last_loss,
        "eval": eval_metrics,
        "trainable_params": n_train,
        "total_params": n_total,
        "skipped_steps": skipped,
        "world_size": accelerator.num_processes,
        "run_dir": str(run_dir),
    }
    if main:
        save_final(run_dir, method, accelerator.unwrap_model(model), tokenizer, cfg, final_state)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        progress.summary(summary)
    accelerator.end_training()
    return Run(summary, accelerator.unwrap_model(model), method)


def _flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers (TensorBoard hparams) take flat scalars only."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
