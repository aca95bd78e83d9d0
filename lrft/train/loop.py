"""The one training loop. Every model, task and method goes through :func:`train`, top to bottom:

setup (accelerator -> data -> model on its device -> method -> optimizer sized after prepare) ->
for each optimizer step: gather ``grad_accum`` micro-batches, forward/backward them with the
token-weighted loss (:mod:`lrft.train.step`), let the step policy clip, check and step or skip
(:mod:`lrft.train.policy`), then log / evaluate / save (:mod:`lrft.train.callbacks`) ->
final trainable state in the run folder.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrft.errors import Interrupted
from lrft.export.peft import write_peft_adapter
from lrft.methods.base import Method
from lrft.run.final import save_final
from lrft.run.folder import resume_command
from lrft.run.plots import write_loss_plot
from lrft.run.topology import topology
from lrft.train import faults
from lrft.train.callbacks import Logger, run_eval, save
from lrft.train.checkpoint import Position, gather_trainable, load_checkpoint, restore_rng, truncate_metrics
from lrft.train.guards import UntrainedWatch
from lrft.train.policy import StepPolicy
from lrft.train.progress import TrainProgress
from lrft.train.setup import make_accelerator, setup, write_run_files
from lrft.train.sharding import unsharded
from lrft.train.state import TrainState
from lrft.train.step import forward_backward


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """A preempted job gets SIGTERM: treat it like Ctrl-C (save, exit), but exit 143 as SIGTERM's."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

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
    method: Method


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> Run:
    """Train one composed config (see :func:`lrft.config.compose.compose`), writing the run folder.

    The summary holds steps, final train loss, final eval metrics and trainable/total parameters.
    """
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    t = cfg.trainer
    acc = make_accelerator(cfg, run_dir)
    main = acc.is_main_process
    set_seed(t.seed)
    topo = topology(acc, run_dir, t.shared_fs)
    writer = topo.writes_node_files(acc)  # global rank 0; on node-local disks each node's local 0
    if writer:
        write_run_files(cfg, run_dir, overrides or [], acc, topo)
    s = setup(cfg, run_dir, acc)
    model, optimizer, scheduler = s.model, s.optimizer, s.scheduler
    if t.report_to:
        acc.init_trackers("lrft", config=_flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
    progress = TrainProgress(s.total, enabled=main and t.progress)
    logger = Logger(acc, run_dir, t, progress)
    state = TrainState(s.total, s.steps_per_epoch, Position(world_size=acc.num_processes))

    if s.resume_from is not None:
        state.pos, rng = load_checkpoint(s.resume_from, acc, optimizer, scheduler)  # weights: in setup
        state.pos.world_size = acc.num_processes
        if main:
            truncate_metrics(logger.file, state.pos.step)
        restore_rng(rng)  # last: nothing after this may draw random numbers before the loop
        state.last_ckpt = str(s.resume_from)
        progress.note(f"resumed from {s.resume_from} at step {state.pos.step} (epoch {state.pos.epoch})")
    elif t.resume:
        progress.note(f"trainer.resume={t.resume}: no checkpoint in {run_dir}, starting from scratch")

    progress.note(
        f"{s.method.name} on {cfg.model.name}: {s.trainable_params:,} of {s.total_params:,} parameters "
        f"train; {acc.num_processes} process(es), mixed precision {acc.mixed_precision}"
    )
    policy = StepPolicy(acc, t, s.method.updates_in_backward, sharded=s.sharded)
    unwrapped = acc.unwrap_model(model)
    decoder_inputs = getattr(unwrapped, "prepare_decoder_input_ids_from_labels", None)
    watch = UntrainedWatch(unwrapped, t.untrained_warn_steps)

    def evaluate(step: int) -> dict[str, Any]:
        with logger.paused():
            metrics = run_eval(acc, model, s.tokenizer, s.eval_examples, cfg)
        logger.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if main:
            write_loss_plot(run_dir)  # RUN/loss.png, train and eval curves so far
        return metrics

    if t.eval_every and s.eval_examples and state.pos.step == 0:  # the curve's origin
        progress.note("step 0: " + _fmt(evaluate(0)))
    state.mark_complete()
    model.train()
    try:
        with progress, signals_as_interrupt():
            for window in _windows(acc, s, state):
                res = forward_backward(
                    acc, model, window, cfg.model.task, decoder_inputs=decoder_inputs,
                    autocast=policy.autocast, step=state.pos.step,
                )  # fmt: skip
                policy.finish(model, optimizer, scheduler, res, state)
                logger.add(res)
                state.pos.step += 1
                step = state.pos.step
                if step % t.log_every == 0 or state.done:
                    logger.flush(state, scheduler.get_last_lr()[0], policy.scale)
                else:
                    progress.update(step)
                watch.check(step)
                state.mark_complete()
                if t.eval_every and step % t.eval_every == 0 and not state.done and s.eval_examples:
                    state.eval_metrics = evaluate(step)
                    progress.note(f"step {step}: " + _fmt(state.eval_metrics))
                if t.save_every and step % t.save_every == 0 and not state.done:
                    with logger.paused():
                        state.last_ckpt = save(acc, run_dir, state, cfg, s, writer)
                faults.maybe("kill_at_step", step)
                faults.maybe("interrupt_at_step", step)
                faults.maybe("term_at_step", step)
    except KeyboardInterrupt as stop:
        done = state.snapshot[0].step if state.snapshot else 0
        saved = save(acc, run_dir, state, cfg, s, writer) if t.save_on_interrupt and done > 0 else None
        hint = f"saved {saved}; resume with: {resume_command(run_dir)}" if saved else "nothing saved"
        code = 143 if str(stop) == "SIGTERM" else 130
        raise Interrupted(f"interrupted at step {done}: {hint}", code=code) from None
    if s.eval_examples:
        state.eval_metrics = evaluate(state.pos.step)
    acc.wait_for_everyone()
    final_state = gather_trainable(acc, model, s.method)  # collective under FSDP / ZeRO-3
    summary = {
        "steps": state.pos.step,
        "train_loss": state.last_loss,
        "eval": state.eval_metrics,
        "trainable_params": s.trainable_params,
        "total_params": s.total_params,
        **logger.throughput(),  # real tokens/s over training time (eval, saves excluded), padding
        "skipped_steps": state.skipped,
        "overflow_steps": state.overflow,
        "world_size": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "resumed_from": str(s.resume_from) if s.resume_from is not None else None,
        "run_dir": str(run_dir),
    }
    with unsharded(acc.unwrap_model(model)):  # FSDP2: whole layers for the exports (a collective)
        if main:
            write_loss_plot(run_dir)
            save_final(run_dir, s.method, acc.unwrap_model(model), s.tokenizer, cfg, final_state)
            # after final/ is committed: a failed export must not cost the trained state
            write_peft_adapter(acc.unwrap_model(model), s.method, cfg, run_dir / "adapter")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            progress.summary(summary)
    acc.end_training()
    return Run(summary, acc.unwrap_model(model), s.method)


def _windows(acc: Any, s: Any, state: TrainState) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of each remaining optimizer step, epoch after epoch, from where the run
    stands (resume skips the micro-batches an epoch already consumed)."""
    while not state.done:
        pos = state.pos
        if s.sampler is not None:
            s.sampler.use_epoch(pos.epoch)
        loader = acc.skip_first_batches(s.loader, pos.batch_in_epoch) if pos.batch_in_epoch else s.loader
        window: list[dict[str, Any]] = []
        for batch in loader:
            batch.pop("refs", None)  # eval-only references never reach the model
            window.append(batch)
            if len(window) == s.grad_accum:
                pos.batch_in_epoch += len(window)
                yield window
                window = []
                if state.done:
                    return
        if window:  # the epoch's last, shorter window still makes a step
            pos.batch_in_epoch += len(window)
            yield window
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0


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
