"""What happens around steps: logging (one host sync per log interval), evaluation, saving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lrft.evaluate import evaluate_model
from lrft.train.checkpoint import save_checkpoint
from lrft.train.progress import TrainProgress
from lrft.train.sharding import is_sharded
from lrft.train.state import TrainState
from lrft.train.step import StepResult


class Logger:
    """metrics.jsonl, the trackers and the progress bar. Between log intervals the step results
    accumulate as device tensors; :meth:`flush` reduces them over ranks with one host sync."""

    def __init__(self, accelerator: Any, run_dir: Path, tcfg: Any, progress: TrainProgress) -> None:
        self.acc, self.t, self.progress = accelerator, tcfg, progress
        self.file = run_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process
        # the whole run's real tokens, padded positions and training seconds (for the summary)
        self.total_real = self.total_padded = self.total_seconds = 0.0
        self._zero()

    def _zero(self) -> None:
        dev = self.acc.device
        # loss sum, loss tokens, real tokens, padded positions
        self.window = torch.zeros(4, dtype=torch.float64, device=dev)
        self.extra: dict[str, torch.Tensor] = {}  # a preference objective's metric sums (per pair)
        self.tick = time.perf_counter()
        self.paused_s = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and checkpoints inside a log window: not training time (tokens/s)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def throughput(self) -> dict[str, float]:
        """Real (non-pad) tokens per training second and the padding share, over the whole run."""
        return {
            "tokens_per_s": self.total_real / self.total_seconds if self.total_seconds else 0.0,
            "padding": 1 - self.total_real / self.total_padded if self.total_padded else 0.0,
        }

    def add(self, res: StepResult) -> None:
        self.window += torch.stack([res.loss_sum, res.count, res.real_tokens, res.padded_tokens]).double()
        for key, value in (res.metrics or {}).items():
            self.extra[key] = self.extra.get(key, 0) + value.double()

    def write(self, record: dict[str, Any]) -> None:
        if self.main:
            with self.file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.t.report_to:
                self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def flush(self, state: TrainState, lr: float, scale: float | None) -> None:
        """The token-weighted train loss since the last flush, over every rank."""
        keys = sorted(self.extra)
        stats = torch.cat([self.window, *(self.extra[k].reshape(1) for k in keys)])
        stats = self.acc.reduce(stats, "sum") if self.acc.num_processes > 1 else stats
        loss_sum, count, real, padded, *extra = stats.tolist()
        elapsed = max(time.perf_counter() - self.tick - self.paused_s, 1e-9)
        self.total_real, self.total_padded = self.total_real + real, self.total_padded + padded
        self.total_seconds += elapsed
        state.last_loss = loss_sum / count if count else float("nan")
        step = state.pos.step
        record = {
            "step": step,
            "epoch": round(step / state.steps_per_epoch, 4),
            "loss": state.last_loss,
            "lr": lr,
            "tokens_per_s": real / elapsed,
            "padding": 1 - real / padded if padded else 0.0,
        }
        if keys:  # a preference objective's metrics, per pair (KTO: per good / bad example)
            from lrft.objectives.preference import average_metrics

            record.update(average_metrics(dict(zip(keys, extra, strict=True)), count))
        if state.skipped:
            record["skipped_steps"] = state.skipped
        if scale is not None:
            record["loss_scale"] = scale
            record["overflow_steps"] = state.overflow
        self.write(record)
        self.progress.update(
            step, loss=state.last_loss, lr=lr, tps=record["tokens_per_s"], pad=record["padding"]
        )
        self._zero()


def evaluate_in_loop(
    accelerator: Any, model: Any, tokenizer: Any, examples: list, cfg: DictConfig
) -> dict[str, Any]:
    """Eval metrics of the model being trained, on the run's eval split (``lrft eval`` is
    :func:`lrft.evaluate.run.run_eval`, on a finished run)."""
    t = cfg.trainer
    unwrapped = accelerator.unwrap_model(model)
    bs = t.eval_batch_size or t.batch_size
    if not is_sharded(unwrapped):
        # split across processes and merged: every rank gets the whole set's metrics
        return evaluate_model(
            unwrapped, tokenizer, examples, cfg.dataset, cfg.model.task, bs, accelerator.device,
            accelerator=accelerator, objective=cfg.get("objective"),
        )  # fmt: skip
    # FSDP2: every forward is a collective, so every rank must run as many as the others. A token
    # loss (instruction data) is split in lockstep (label-free filler batches even the count out);
    # GLUE metrics count rows and generate for T5, so there every rank evaluates the whole set
    # (identical results, no merge). Autocast as the loop's forward.
    split = cfg.dataset.kind != "glue"
    with accelerator.autocast():
        return evaluate_model(
            unwrapped, tokenizer, examples, cfg.dataset, cfg.model.task, bs, accelerator.device,
            accelerator=accelerator if split else None, lockstep=split, objective=cfg.get("objective"),
        )  # fmt: skip


def save(
    accelerator: Any, run_dir: Path, state: TrainState, cfg: DictConfig, setup: Any, writer: bool
) -> str | None:
    """A checkpoint of the last completed step (every rank calls this: it holds collectives).
    ``writer``: this process writes its node's copy (see :mod:`lrft.run.topology`)."""
    assert state.snapshot is not None
    pos, rng = state.snapshot
    s = setup
    path = save_checkpoint(
        accelerator, run_dir, pos, rng, cfg, s.method, s.model, s.optimizer, s.scheduler, writer=writer
    )
    return str(path) if path is not None else state.last_ckpt
