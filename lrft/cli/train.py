"""``lrft train``: check the overrides (did-you-mean before Hydra is imported), guard the run folder,
expand sweeps, then hand over to Hydra, which runs :func:`lrft.train.train` in the run folder.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from itertools import islice, product
from typing import Any

from rich.console import Console
from rich.markup import escape

from lrft.cli.help import print_train_help, print_versions
from lrft.config import source
from lrft.errors import EXIT_USAGE, Interrupted, UserError

console = Console(stderr=True)


def expand_sweeps(overrides: list[str], limit: int = 64) -> list[list[str]]:
    """Every combination a ``-m`` sweep would run (capped), so each is validated before any work."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov, text in zip(parsed, overrides, strict=True):
        if ov.is_sweep_override():
            key = text.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(c) for c in islice(product(*choices), limit)]


def train_cmd(argv: list[str]) -> int:
    if "--version" in argv:  # Hydra's own flag would print Hydra's version
        print_versions()
        return 0
    if argv and argv[0] in ("-h", "--help"):  # Hydra's parser would cost its import
        print_train_help()
        return 0
    from lrft.run.start_from import refuse_given, without

    refuse_given(argv)  # start_from.* is checkpoint='s record, never typed
    if not any(a.startswith("-") for a in argv):
        from lrft.config.compose import quick_check

        quick_check(without(argv))  # the common typos answer before Hydra is even imported
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_intermixed_args(argv)
    if args.help:
        print_train_help()
        return 0
    try:
        combos = expand_sweeps(args.overrides) if args.multirun else [args.overrides]
    except Exception as err:  # the override grammar's own errors
        raise UserError(f"Cannot parse the overrides {args.overrides}: {err}") from None
    flags = _without_source_flags([a for a in argv if a not in args.overrides])
    overrides = list(args.overrides)
    config = source.from_flags(args.config_dir, args.config_name, args.config_path)
    config = config if config.user_dir or config.name != "train" else _saved_source(overrides)
    source.use(replace(config, command=list(argv)))
    try:
        if overrides != (started := _start_from(args, combos)):  # composes: after the source is known
            overrides, combos = started, [started]
        return _launch(args, flags, overrides, combos)
    finally:
        source.use(source.Source())  # the next command in this process composes afresh


def _launch(args: Any, flags: list[str], overrides: list[str], combos: list[list[str]]) -> int:
    from lrft.config.compose import compose

    inspecting = args.cfg or args.info or args.shell_completion
    if args.multirun or inspecting:  # sweeps write fresh multirun/ folders (locked by each job)
        for combo in combos:  # fail before any work, with did-you-mean, instead of mid-sweep
            compose(combo)
        return _run_hydra(_info_flag(flags), overrides)
    from lrft.run.folder import prepare, unlock
    from lrft.run.topology import launched_world

    launched_world()  # a half-launched process stops before it touches output_dir
    try:
        _tidy_start(overrides)
        prepared = prepare(
            overrides, say=lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True)
        )
        if prepared is None:
            return 0  # a finished run resumed: nothing left to do
        cfg = compose(prepared)  # fail before any work, with did-you-mean
        from lrft.run.start_from import ensure_start

        ensure_start(cfg, _say)  # checkpoint=RUN: the merged start in output_dir/base (once)
        return _run_hydra(_info_flag(flags), prepared)
    finally:
        unlock(overrides)  # the run is over: release output_dir (and tidy it if nothing was written)


def _start_from(args: Any, combos: list[list[str]]) -> list[str]:
    """``checkpoint=RUN`` (:mod:`lrft.run.start_from`): the run starts from RUN's final model
    merged, not continued; translated into the overrides ``run_info.json`` then records."""
    from lrft.run.start_from import requested, translate

    overrides = list(args.overrides)
    if requested(overrides) is None:
        return overrides
    if args.multirun:
        raise UserError("checkpoint=RUN starts one run: launch each run of a sweep on its own (no -m).")
    from lrft.config.compose import compose

    return translate(overrides, compose)


def _tidy_start(overrides: list[str]) -> None:
    """A start merged into ``output_dir`` whose run never began is merged again (see
    :func:`lrft.run.start_from.tidy_unstarted`); the folder is claimed first."""
    from pathlib import Path

    from lrft.run.folder import _override_value, claim

    out = _override_value(overrides, "output_dir")
    if out is None or _override_value(overrides, "start_from.run") is None:
        return
    folder = Path(out).expanduser().resolve()
    if folder.is_dir():
        from lrft.run.start_from import tidy_unstarted

        claim(folder)
        tidy_unstarted(folder)


SOURCE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def _without_source_flags(flags: list[str]) -> list[str]:
    """Hydra's flags minus the config source's: lrft passes the source itself (searchpath and
    ``--config-name``, :func:`_run_hydra`), the same way for a new run and for a resume."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in SOURCE_FLAGS:
            skip = True  # its value follows
        elif not flag.startswith(tuple(f + "=" for f in SOURCE_FLAGS)):
            out.append(flag)
    return out


def _saved_source(overrides: list[str]) -> source.Source:
    """A resume without flags composes from the source the run recorded (``--config-dir``...)."""
    from pathlib import Path

    from lrft.run.folder import _is_off, _override_value

    out = _override_value(overrides, "output_dir")
    if out is None or _is_off(_override_value(overrides, "trainer.resume")):
        return source.Source()
    return source.saved(Path(out).expanduser().resolve()) or source.Source()


def _say(text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _info_flag(flags: list[str]) -> list[str]:
    """A bare ``--info`` would take the next argument as its choice: make it ``--info=all``."""
    return ["--info=all" if f in ("--info", "-i") else f for f in flags]


def _run_hydra(flags: list[str], overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, open_dict

    from lrft.config.compose import (
        absolute_paths,
        config_dir,
        normalize_overrides,
        register_schemas,
        searchpath_override,
    )
    from lrft.config.validate import validate

    register_schemas()

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def task(cfg: DictConfig) -> None:
        from lrft.train import train

        hc = HydraConfig.get()
        run_dir = hc.runtime.output_dir
        try:
            validate(cfg)
            with open_dict(cfg):
                cfg.output_dir = run_dir
            absolute_paths(cfg)
            train(cfg, run_dir, list(hc.overrides.task))
        except UserError as err:
            console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            _after_failure(run_dir, str(err))
            sys.exit(EXIT_USAGE)
        except Interrupted as stop:
            console.print(f"[bold yellow]{escape(str(stop))}[/]", highlight=False, soft_wrap=True)
            sys.exit(stop.code)
        except Exception:
            import traceback

            _after_failure(run_dir, traceback.format_exc())
            raise

    saved = sys.argv
    # flags first: Hydra's parser wants the overrides in one contiguous run
    extra = [searchpath_override(), *_distributed_overrides(overrides)]
    flags = [*flags, *source.current().flags()]  # the run's config source, new or resumed
    sys.argv = ["lrft train", *flags, *normalize_overrides(overrides), *extra]
    try:
        task()
    except SystemExit as stop:  # a job's UserError (exit 2) or Hydra's own failure (exit 1)
        return int(stop.code or 0)
    finally:
        sys.argv = saved
    return 0


def _after_failure(run_dir: str, message: str) -> None:
    """A run that failed: remove its folder if training never started, else leave error.txt."""
    from pathlib import Path

    from lrft.run.folder import failed_before_training

    if int(os.environ.get("RANK", "0")) != 0:
        return
    done = failed_before_training(Path(run_dir), message)
    if done:
        console.print(f"[dim]{escape(done)}[/]", highlight=False, soft_wrap=True)


def _distributed_overrides(overrides: list[str]) -> list[str]:
    """One run folder per launch: every process takes rank 0's timestamp; only rank 0 writes
    Hydra's own files (.hydra/, the job log)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        os.environ["LRFT_RUN_STAMP"] = time.strftime("%Y-%m-%d_%H-%M-%S")
        return []
    import torch.distributed as dist
    from accelerate import PartialState

    from lrft.run.topology import use_cpu

    cpu = any(o.lower() in ("trainer.cpu=true", "trainer.cpu=1") for o in overrides)
    PartialState(cpu=use_cpu(cpu))  # the process group the run's Accelerator will reuse
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ["LRFT_RUN_STAMP"] = stamp[0]
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
