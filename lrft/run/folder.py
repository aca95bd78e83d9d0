"""Run folders that are never silently reused, and resume from the run's own config.

``lrft train`` calls :func:`prepare` before any work. An existing run folder at ``output_dir`` is

- finished (``summary.json`` or ``final/``): refused, unless ``trainer.resume=auto`` (nothing left
  to do, nothing touched) or ``trainer.overwrite=true`` (only what lrft wrote is removed);
- unfinished (``config.yaml`` or ``checkpoints/`` but no summary): refused, with the command that
  resumes it, unless ``trainer.resume`` (continue) or ``trainer.overwrite=true`` (start over).

A resume re-composes the run from its saved overrides (``run_info.json``, or Hydra's
``.hydra/overrides.yaml``), so ``lrft train output_dir=RUN trainer.resume=auto`` alone continues
the original run. Overrides given at resume go on top; any that changes the math (model, method,
data, batch, accumulation, schedule, seed, precision) is refused, and the composed config must
match ``RUN/config.yaml`` on every such key (config files edited since the run started are caught
too). Everything here is torch-free: a refusal costs no model import.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from lrft.errors import UserError
from lrft.run.lock import LOCK_NAME, Held, acquire, holds, release
from lrft.schema import TRUTHY

# every name lrft (or Hydra, or a tracker it starts) writes into a run folder
RUN_FILES = (
    "config.yaml",
    "run_info.json",
    "metrics.jsonl",
    "summary.json",
    "eval.json",
    "error.txt",
    "loss.png",
    "cli.log",
    "train.log",
    ".hydra",
    "final",
    "adapter",
    "base",
    "checkpoints",
    "lrft",  # accelerate's tensorboard tracker (trainer.report_to)
)
# written before training starts: a run that failed with nothing else is only these
SETUP_FILES = ("config.yaml", "run_info.json", "cli.log", "train.log", ".hydra", "error.txt", "base")
# (base/: a randomly initialised model's weights, written before the method is applied; a retry
# writes them again from the seed)
# trainer keys that do not change what is computed: allowed to differ at resume
HARMLESS_TRAINER = (
    "log_every",
    "eval_every",
    "save_every",
    "progress",
    "keep_checkpoints",
    "report_to",
    "save_on_interrupt",
    "eval_batch_size",
    "untrained_warn_steps",
    "resume",
    "overwrite",
    "verbose",
    "cpu",
    "gradient_checkpointing",
    "dataloader_workers",
    "allow_tf32",
)
NOT_COMPARED = ("output_dir",)


def resume_command(run_dir: str | Path) -> str:
    """The command that continues ``run_dir``: it works verbatim, from any folder (the run's own
    config is re-composed from its saved overrides)."""
    path = shlex.quote(str(Path(run_dir).resolve()))
    return f"lrft train output_dir={path} trainer.resume=auto"


def run_state(run_dir: Path) -> str:
    """``absent`` | ``empty`` | ``finished`` | ``unfinished`` | ``failed`` (an attempt that stopped
    before its first step: setup files and error.txt only) | ``foreign`` (files, but no lrft run)."""
    if not run_dir.exists():
        return "absent"
    if not run_dir.is_dir():
        return "foreign"
    names = {p.name for p in run_dir.iterdir()} - {LOCK_NAME}
    if not names:
        return "empty"
    if "summary.json" in names or (run_dir / "final" / "COMPLETE").is_file():
        return "finished"
    if "error.txt" in names and names <= set(SETUP_FILES):
        return "failed"
    if names & {"config.yaml", "checkpoints", "run_info.json"}:
        return "unfinished"
    return "foreign"


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value of the last ``key=...`` among ``overrides`` (with or without a ``+``/``++``)."""
    found = None
    for text in overrides:
        k, sep, v = text.partition("=")
        if sep and k.lstrip("+") == key:
            found = v
    return found


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUTHY


def _is_off(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("null", "none", "", "false")


def prepare(overrides: list[str], say: Any = print) -> list[str] | None:
    """The overrides to train with, after checking ``output_dir``; None: nothing left to do.

    Raises :class:`UserError` (exit 2) when the folder holds a run the command would clobber, or
    another process holds it (:mod:`lrft.run.lock`: the lock is taken here, before anything in
    the folder is read, removed or written, and held by this process until the run ends).
    """
    out = _override_value(overrides, "output_dir")
    if out is None:  # the default folder is new for every launch (timestamped)
        return overrides
    run_dir = Path(out).expanduser().resolve()
    resume = _override_value(overrides, "trainer.resume")
    resuming = not _is_off(resume)
    overwrite = _truthy(_override_value(overrides, "trainer.overwrite"))
    if run_state(run_dir) != "foreign":  # a folder that is not lrft's gets no lock file
        claim(run_dir)
    state = run_state(run_dir)
    if state in ("absent", "empty"):
        return overrides
    if state == "foreign":
        if not run_dir.is_dir():
            raise UserError(f"output_dir={run_dir} exists and is not a folder.")
        raise UserError(
            f"output_dir={run_dir} is not empty and holds no lrft run ({_listing(run_dir)}): "
            "choose a new or empty folder."
        )
    if overwrite and resuming:
        raise UserError("trainer.overwrite=true starts over and trainer.resume continues: choose one.")
    if state == "failed":  # nothing was trained: the next attempt (with its fix) takes its place
        if int(os.environ.get("RANK", "0")) == 0:
            remove_run_files(run_dir)
            say(f"{run_dir} held an attempt that failed before its first step: starting afresh there.")
        return [o for o in overrides if _key(o) != "trainer.resume"]
    if overwrite:
        if int(os.environ.get("RANK", "0")) == 0:  # one process removes, the others only train
            kept = remove_run_files(run_dir)
            say(
                f"trainer.overwrite=true: removed the previous run in {run_dir}"
                + (f" (kept what lrft did not write: {', '.join(kept)})" if kept else "")
            )
        return overrides
    if state == "finished":
        if resuming:
            # overrides that change the math are refused even here: they ask for another run
            resume_overrides(run_dir, overrides, say=lambda _: None, finished=True)
            say(f"{run_dir} is a finished run: nothing left to do (its summary: {run_dir / 'summary.json'}).")
            return None
        raise UserError(
            f"output_dir={run_dir} holds a finished run. Choose a new output_dir, or add "
            "trainer.overwrite=true to replace it (only the files lrft wrote are removed)."
        )
    if not resuming:
        raise UserError(
            f"output_dir={run_dir} holds an unfinished run{_last_step(run_dir)}. Continue it with:\n"
            f"  {resume_command(run_dir)}\n"
            "or add trainer.overwrite=true to start it over (only the files lrft wrote are removed)."
        )
    return resume_overrides(run_dir, overrides, say)


def claim(run_dir: Path, any_rank: bool = False) -> bool:
    """Lock ``run_dir`` for this process (:mod:`lrft.run.lock`); False if it held it already. A
    folder another process holds is refused with its owner and what to do."""
    try:
        return acquire(run_dir, any_rank=any_rank)
    except Held as held:
        raise UserError(
            f"{held} A run folder has one writer: wait for that run to finish, or stop it (Ctrl-C "
            f"saves a checkpoint) and continue it with:\n  {resume_command(held.folder)}\n"
            "or choose another output_dir."
        ) from None


def unlock(overrides: list[str]) -> None:
    """Release the ``output_dir=`` of ``overrides`` if this process holds it; a folder left holding
    only the lock file (the run stopped before writing anything) is removed."""
    out = _override_value(overrides, "output_dir")
    if out is None or not holds(Path(out).expanduser()):
        return
    folder = Path(out).expanduser().resolve()
    release(folder)
    try:
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
    except OSError:
        pass


def _last_step(run_dir: Path) -> str:
    step = checkpoint_step(run_dir)
    return f" (last checkpoint: step {step})" if step is not None else " (no checkpoint)"


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def saved_overrides(run_dir: Path) -> list[str] | None:
    """The overrides the run was launched with (None when the run folder does not record them)."""
    info = run_dir / "run_info.json"
    if info.is_file():
        try:
            saved = json.loads(info.read_text()).get("overrides")
        except ValueError:
            saved = None
        if isinstance(saved, list):
            return [str(s) for s in saved]
    hydra = run_dir / ".hydra" / "overrides.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        return [str(s) for s in OmegaConf.load(hydra)]
    return None


def _key(text: str) -> str:
    return text.partition("=")[0].lstrip("+~")


def resume_overrides(run_dir: Path, given: list[str], say: Any = print, finished: bool = False) -> list[str]:
    """The run's saved overrides with ``given`` on top, checked to leave the math unchanged.

    ``finished``: the run has nothing left to do; only overrides given now are checked (a run
    started through the Python API records no overrides, so its re-composition may differ).
    """
    from omegaconf import OmegaConf

    from lrft.config.compose import compose

    saved = saved_overrides(run_dir)
    if saved is None and finished:
        saved = []
    if saved is None:
        raise UserError(
            f"{run_dir} does not record the overrides it was launched with (no run_info.json or "
            ".hydra/overrides.yaml): resume it with the full original command plus trainer.resume=auto."
        )
    own = ("output_dir", "trainer.resume", "trainer.overwrite")
    base = [_pinned(o, run_dir) for o in saved if _key(o) not in own]
    extra = [o for o in given if _key(o) not in own]
    merged = [*base, *extra, *(o for o in given if _key(o) in own)]
    cfg = compose(merged)
    if (run_dir / "config.yaml").is_file():
        before = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
        now = _flat(OmegaConf.to_container(cfg, resolve=True))
        # keys added to the schemas since the run started (absent from its config.yaml) are new
        # options at their defaults, not changes
        changed = {k: (before[k], now[k]) for k in before.keys() & now.keys()}
        changed = {k: v for k, v in changed.items() if v[0] != v[1] and k not in NOT_COMPARED}
        math = sorted(k for k in changed if not _harmless(k))
        asked = {_key(o) for o in extra}
        if finished:  # only what was asked now
            math = [k for k in math if k in asked or k.split(".")[0] in asked]
        if math:
            lines = [f"{k}: run {changed[k][0]!r} -> now {changed[k][1]!r}" for k in math]
            why = (
                "these overrides change what the run computes"
                if any(k in asked or k.split(".")[0] in asked for k in math)
                else "the config files changed since the run started"
            )
            raise UserError(
                f"Cannot resume {run_dir}: {why}.\n  " + "\n  ".join(lines) + "\nResume with "
                f"`{resume_command(run_dir)}` (plus only logging/eval/save keys), or start a new run."
            )
        if not finished:
            _check_schedule(run_dir, cfg)
    listed = " ".join(base) or "(the defaults)"
    say(f"resuming {run_dir} with its original overrides: {listed}")
    if extra:
        say(f"  and, on top: {' '.join(extra)}")
    return merged


def _pinned(override: str, run_dir: Path) -> str:
    """A data path override as the run resolved it (absolute in its config.yaml): a relative path
    typed in another folder must not point somewhere else at resume."""
    from omegaconf import OmegaConf

    from lrft.config.compose import PATH_KEYS

    key = _key(override)
    if key not in PATH_KEYS or not (run_dir / "config.yaml").is_file():
        return override
    value = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), key, default=None)
    return override if value is None else f"{override.partition('=')[0]}={value}"


def _harmless(key: str) -> bool:
    group, _, leaf = key.partition(".")
    return group == "trainer" and leaf in HARMLESS_TRAINER


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir`` (None when there is none)."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file()) if root.is_dir() else []
    if not done:
        return None
    try:
        return int(json.loads((done[-1] / "state.json").read_text())["position"]["step"])
    except (OSError, ValueError, KeyError):
        return int(done[-1].name.removeprefix("step-"))


def _check_schedule(run_dir: Path, cfg: Any) -> None:
    """A checkpoint past the run's last step cannot be continued by this schedule."""
    step = checkpoint_step(run_dir)
    if step is None:
        return
    t = cfg.trainer
    if t.max_steps > 0 and step > t.max_steps:
        raise UserError(
            f"Cannot resume {run_dir}: its checkpoint is at step {step}, past the schedule's "
            f"trainer.max_steps={t.max_steps}."
        )
    state = run_dir / "checkpoints" / f"step-{step:08d}" / "state.json"
    try:
        epoch = json.loads(state.read_text())["position"]["epoch"]
    except (OSError, ValueError, KeyError):
        return
    if t.max_steps <= 0 and epoch > t.epochs:
        raise UserError(
            f"Cannot resume {run_dir}: its checkpoint is in epoch {epoch}, past trainer.epochs={t.epochs}."
        )


def remove_run_files(run_dir: Path) -> list[str]:
    """Remove what lrft wrote in ``run_dir``; returns the names left (not lrft's), sorted."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for stale in run_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def failed_before_training(run_dir: Path, message: str) -> str:
    """Clean up after a run that failed: a folder holding only its setup files (config, log) is
    removed; one with more (checkpoints, metrics) keeps everything and gets ``error.txt``.
    Returns what was done, for the message."""
    if not run_dir.is_dir():
        return ""
    names = {p.name for p in run_dir.iterdir()}
    if names <= {*SETUP_FILES, LOCK_NAME}:
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"removed its folder {run_dir} (nothing was trained)"
    (run_dir / "error.txt").write_text(message.rstrip() + "\n")
    return f"the error is in {run_dir / 'error.txt'}"
