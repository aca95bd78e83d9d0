"""The one training loop. Every model, task and method goes through :func:`train`, top to bottom:

engine (:mod:`lrft.train.engine`) -> setup (data -> model on its device -> method -> optimizer
sized after prepare) -> resume -> steps: for each optimizer step gather ``grad_accum``
micro-batches, forward/backward them with the token-weighted loss (:mod:`lrft.train.step`), let the
step policy clip, check and update or skip (:mod:`lrft.train.policy`), then log / evaluate / save
(:mod:`lrft.train.callbacks`) -> finish: final trainable state and exports in the run folder.
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
from lrft.memory.choose import apply_plan
from lrft.methods.base import Method
from lrft.run.final import save_final
from lrft.run.folder import claim, resume_command
from lrft.run.lock import release
from lrft.run.plots import write_loss_plot
from lrft.run.topology import topology
from lrft.train import faults
from lrft.train.callbacks import Logger, evaluate_in_loop, save
from lrft.train.checkpoint import Position, gather_trainable, load_checkpoint, restore_rng, truncate_metrics
from lrft.train.disk import final_write
from lrft.train.engine import make_engine
from lrft.train.guards import UntrainedWatch
from lrft.train.policy import StepPolicy
from lrft.train.progress import TrainProgress
from lrft.train.setup import Setup, setup, write_run_files
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

    Phases: engine and run files, :func:`setup`, resume, the steps, the finish (final eval, final
    state, exports). The summary holds steps, final train loss, final eval metrics and
    trainable/total parameters.
    """
    run_dir = Path(run_dir)
    took = claim(run_dir)  # the CLI took it already; API callers get it here (lrft.run.lock)
    try:
        return _train(cfg, run_dir, overrides)
    finally:
        if took:
            release(run_dir)


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> Run:
    from accelerate.utils import set_seed

    engine = make_engine(cfg, run_dir)
    acc = engine.accelerator
    cfg, plan = apply_plan(cfg, engine)  # trainer.memory_plan=auto: batch, accumulation, checkpointing
    t = cfg.trainer
    set_seed(t.seed)
    topo = topology(acc, run_dir, t.shared_fs)
    writer = topo.writes_node_files(acc)  # global rank 0; on node-local disks each node's local 0
    # a node's own copy of the folder (node-local disks) has one writer too
    node_lock = writer and not acc.is_main_process and claim(run_dir, any_rank=True)
    try:
        return _run(cfg, run_dir, overrides, engine, topo, writer, plan)
    finally:
        if node_lock:
            release(run_dir)


def _run(
    cfg: DictConfig, run_dir: Path, overrides: list[str] | None, engine: Any, topo: Any, writer: bool,
    plan: Any,
) -> Run:  # fmt: skip
    acc, t = engine.accelerator, cfg.trainer
    if writer:
        write_run_files(cfg, run_dir, overrides or [], engine, topo, plan)
    s = setup(cfg, run_dir, engine)
    if t.report_to:
        acc.init_trackers("lrft", config=_flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
    progress = TrainProgress(s.total, enabled=acc.is_main_process and t.progress)
    state = TrainState(s.total, s.steps_per_epoch, Position(world_size=acc.num_processes))
    live = Live(cfg, run_dir, acc, s, state, Logger(acc, run_dir, t, progress), progress, writer)

    _resume(live)
    if plan is not None:
        progress.note(f"memory plan ({plan['setting']}, {plan['budget_gb']:g} GiB): {plan['summary']}")
    progress.note(
        f"{s.method.name} on {cfg.model.name}: {s.trainable_params:,} of {s.total_params:,} parameters "
        f"train; {acc.num_processes} process(es), mixed precision {acc.mixed_precision}"
    )
    if t.eval_every and s.eval_examples and state.pos.step == 0:  # the curve's origin
        progress.note("step 0: " + _fmt(live.evaluate(0)))
    state.mark_complete()
    s.model.train()
    try:
        with progress, signals_as_interrupt():
            _steps(live)
    except KeyboardInterrupt as stop:
        raise _interrupted(live, str(stop)) from None
    summary = _finish(live)
    return Run(summary, acc.unwrap_model(s.model), s.method)


@dataclass
class Live:
    """The objects of one run that its phases share."""

    cfg: DictConfig
    run_dir: Path
    acc: Any
    s: Setup
    state: TrainState
    logger: Logger
    progress: TrainProgress
    writer: bool  # this process writes its node's files (see lrft.run.topology)

    def evaluate(self, step: int) -> dict[str, Any]:
        with self.logger.paused():
            metrics = evaluate_in_loop(
                self.acc, self.s.model, self.s.tokenizer, self.s.eval_examples, self.cfg
            )
        self.logger.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if self.acc.is_main_process:
            write_loss_plot(self.run_dir)  # RUN/loss.png, train and eval curves so far
        return metrics

    def save(self) -> str | None:
        return save(self.acc, self.run_dir, self.state, self.cfg, self.s, self.writer)


def _resume(live: Live) -> None:
    """Optimizer, scheduler, position and RNG from the checkpoint (its weights: in setup)."""
    s, state, t = live.s, live.state, live.cfg.trainer
    if s.resume_from is None:
        if t.resume:  # stopped before its first checkpoint: its records are about to be redone
            if live.acc.is_main_process:
                truncate_metrics(live.logger.file, -1)
            live.progress.note(
                f"trainer.resume={t.resume}: {live.run_dir} has no checkpoint yet, so the run starts "
                "over from step 0 (its earlier metrics records removed)"
            )
        return
    state.pos, rng = load_checkpoint(s.resume_from, live.acc, s.optimizer, s.scheduler)
    state.pos.world_size = live.acc.num_processes
    if live.acc.is_main_process:
        truncate_metrics(live.logger.file, state.pos.step)
    restore_rng(rng)  # last: nothing after this may draw random numbers before the loop
    state.last_ckpt = str(s.resume_from)
    live.progress.note(f"resumed from {s.resume_from} at step {state.pos.step} (epoch {state.pos.epoch})")


def _steps(live: Live) -> None:
    """Every remaining optimizer step: forward and backward over the window's micro-batches, the
    update, then logging, evaluation and checkpoints at their intervals."""
    acc, s, state, logger, t = live.acc, live.s, live.state, live.logger, live.cfg.trainer
    policy = StepPolicy(acc, t, s.method.updates_in_backward, sharded=s.sharded)
    unwrapped = acc.unwrap_model(s.model)
    decoder_inputs = getattr(unwrapped, "prepare_decoder_input_ids_from_labels", None)
    watch = UntrainedWatch(unwrapped, t.untrained_warn_steps)
    for window in _windows(acc, s, state):
        res = forward_backward(
            acc, s.model, window, live.cfg.model.task, decoder_inputs=decoder_inputs,
            autocast=policy.autocast, step=state.pos.step, loss_chunk=t.loss_chunk, seed=t.seed,
            objective=s.objective,
        )  # fmt: skip
        policy.update(s.model, s.optimizer, s.scheduler, res, state)
        logger.add(res)
        state.pos.step += 1
        step = state.pos.step
        if step % t.log_every == 0 or state.done:
            logger.flush(state, s.scheduler.get_last_lr()[0], policy.scale)
        else:
            live.progress.update(step)
        watch.check(step)
        state.mark_complete()
        if t.eval_every and step % t.eval_every == 0 and not state.done and s.eval_examples:
            state.eval_metrics = live.evaluate(step)
            live.progress.note(f"step {step}: " + _fmt(state.eval_metrics))
        if t.save_every and step % t.save_every == 0 and not state.done:
            with logger.paused():
                state.last_ckpt = live.save()
        faults.maybe("kill_at_step", step)
        faults.maybe("interrupt_at_step", step)
        faults.maybe("term_at_step", step)


def _interrupted(live: Live, signal_name: str) -> Interrupted:
    """Ctrl-C or SIGTERM: save the last completed step (if asked and any), say how to resume."""
    state = live.state
    done = state.snapshot[0].step if state.snapshot else 0
    saved = live.save() if live.cfg.trainer.save_on_interrupt and done > 0 else None
    hint = f"saved {saved}; resume with: {resume_command(live.run_dir)}" if saved else "nothing saved"
    code = 143 if signal_name == "SIGTERM" else 130
    return Interrupted(f"interrupted at step {done}: {hint}", code=code)


def _finish(live: Live) -> dict[str, Any]:
    """Final eval, then the final state, the PEFT adapter, the plot and summary.json."""
    acc, s, state, run_dir = live.acc, live.s, live.state, live.run_dir
    if s.eval_examples:
        state.eval_metrics = live.evaluate(state.pos.step)
    acc.wait_for_everyone()
    final_state = gather_trainable(acc, s.model, s.method)  # a collective under FSDP2
    summary = {
        "steps": state.pos.step,
        "train_loss": state.last_loss,
        "eval": state.eval_metrics,
        "trainable_params": s.trainable_params,
        "total_params": s.total_params,
        **live.logger.throughput(),  # real tokens/s over training time (eval, saves excluded), padding
        "skipped_steps": state.skipped,
        "overflow_steps": state.overflow,
        "world_size": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "resumed_from": str(s.resume_from) if s.resume_from is not None else None,
        "run_dir": str(run_dir),
    }
    model = acc.unwrap_model(s.model)
    with unsharded(model):  # FSDP2: whole layers for the exports (a collective)
        if acc.is_main_process:
            write_loss_plot(run_dir)
            with final_write(run_dir, final_state, state.pos.step):  # a full disk: how to finish
                save_final(run_dir, s.method, model, s.tokenizer, live.cfg, final_state)
                write_peft_adapter(model, s.method, live.cfg, run_dir / "adapter")
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                (run_dir / "error.txt").unlink(missing_ok=True)  # an earlier attempt's: now moot
            live.progress.summary(summary)
    acc.end_training()
    return summary


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
