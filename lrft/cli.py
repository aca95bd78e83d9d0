"""``lrft`` command line: subcommands dispatch to Hydra-composed plain functions; no logic here."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from itertools import islice, product

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lrft.errors import EXIT_USAGE, Interrupted, UserError, did_you_mean

console = Console(stderr=True)
out = Console()

EXAMPLES = """\
  lrft train                                       quickstart: tiny LLaMA, LoRA-FA, bundled data, CPU
  lrft train method=lora_fa model=llama7b dataset=alpaca
  lrft train model=tiny_roberta dataset=glue/sst2 dataset.data_files.train=train.jsonl \\
             dataset.data_files.validation=dev.jsonl
  lrft train model=hf model.name_or_path=DIR dataset=chat dataset.data_files.train=chats.jsonl
  lrft generate checkpoint=runs/RUN prompt="Name three colors"
  lrft train -m method=lora,lora_fa method.r=4,8   sweep: one run folder per job
  lrft train model=llama7b --cfg job               print the composed config and exit"""

SUBCOMMANDS = {
    "train": "fine-tune a model: compose model/method/quantization/optimizer/dataset configs and run",
    "eval": "evaluate a run, a merged export or a base model on GLUE (official metrics) or MMLU",
    "merge": "fold a run's trained state into the original base weights: a plain transformers folder",
    "export": "write a run's adapter in PEFT's format (peft.PeftModel.from_pretrained loads it)",
    "memory": "plan a run's memory (weights, gradients, optimizer, activations) without loading weights",
    "plot": "overlay the loss (or an eval metric) of one or more run folders into one PNG",
    "generate": "answer prompts with a run, a merged export or a base model (streamed, or a JSONL batch)",
    "chat": "chat with a run in the terminal, in its own chat template",
}


def print_overview() -> None:
    from lrft import __version__

    out.print(f"[bold]lrft {__version__}[/]: memory-efficient low-rank fine-tuning\n")
    out.print("usage: lrft <command> [key=value ...] [hydra flags]\n")
    table = Table(show_header=False, box=None, padding=(0, 2))
    for name, text in SUBCOMMANDS.items():
        table.add_row(f"[bold cyan]{name}[/]", text)
    out.print(table)
    out.print("\n`lrft <command> --help` lists that command's config groups and keys.\n\nexamples:")
    out.print(EXAMPLES, markup=False, highlight=False)


def print_train_help() -> None:
    """Config groups and every trainer key with its EFFECTIVE default: the one ``lrft train``
    runs with (the default dataset config sets its own trainer values)."""
    from lrft.config import GROUPS, TrainerConfig, group_options
    from lrft.help import schema_table, train_defaults

    choices, values = train_defaults()
    out.print("[bold]lrft train[/] " + escape("[group=option ...] [group.key=value ...] [-m] [--cfg job]\n"))
    table = Table(title="config groups (defaults in bold)", show_lines=False)
    table.add_column("group")
    table.add_column("options")
    for group in GROUPS:
        opts = [f"[bold]{o}[/]" if o == choices.get(group) else o for o in group_options(group)]
        table.add_row(group, ", ".join(opts))
    out.print(table)
    dataset = choices.get("dataset", "?")
    title = f"trainer.* keys (defaults as `lrft train` runs them, with dataset={dataset})"
    out.print(schema_table(title, TrainerConfig, "trainer.", values))
    also = [
        f"{k}={v}"
        for k, v in values.items()
        if k in ("optimizer.lr", "dataset.max_length", "dataset.prompt_template")
    ]
    out.print(
        (f"Also set by dataset={dataset}: {', '.join(also)}.\n" if also else "")
        + "Each group's keys: `lrft train --cfg job` prints them all, e.g. method.r, method.alpha,\n"
        "method.dropout, method.target_modules, optimizer.lr, dataset.data_files.train, model.name_or_path.\n"
        "Resume a stopped run with `lrft train output_dir=RUN trainer.resume=auto` (its own config).\n"
        "Global flags: -v/--verbose (or verbose=true) shows third-party progress bars and warnings.\n"
        "Hydra's own flags: --cfg job|hydra|all, -m/--multirun, --info, --hydra-help.\n\nexamples:",
        highlight=False,
        markup=False,
    )
    out.print(EXAMPLES, markup=False, highlight=False)


def print_versions() -> None:
    """lrft's version and its key dependencies', read from the installed metadata (no imports)."""
    from importlib import metadata

    from lrft import __version__

    out.print(f"lrft {__version__}", highlight=False)
    for pkg in ("torch", "transformers", "accelerate", "peft", "datasets", "hydra-core", "bitsandbytes"):
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "not installed"
        out.print(f"  {pkg} {version}", highlight=False)


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
    if not any(a.startswith("-") for a in argv):
        from lrft.config import quick_check

        quick_check(argv)  # the common typos answer before Hydra is even imported
    from hydra._internal.utils import get_args_parser

    from lrft.config import compose

    args = get_args_parser().parse_intermixed_args(argv)
    if args.help:
        print_train_help()
        return 0
    try:
        combos = expand_sweeps(args.overrides) if args.multirun else [args.overrides]
    except Exception as err:  # the override grammar's own errors
        raise UserError(f"Cannot parse the overrides {args.overrides}: {err}") from None
    flags = list(argv)
    for override in args.overrides:
        flags.remove(override)
    overrides = list(args.overrides)
    inspecting = args.cfg or args.info or args.shell_completion
    if not args.multirun and not inspecting:  # sweeps write fresh multirun/ folders
        from lrft.runs import prepare

        prepared = prepare(
            overrides, say=lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True)
        )
        if prepared is None:
            return 0  # a finished run resumed: nothing left to do
        overrides = prepared
        combos = [overrides]
    for combo in combos:  # fail before any work, with did-you-mean, instead of mid-sweep
        compose(combo)
    return _run_hydra(_info_flag(flags), overrides)


def _say(text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _info_flag(flags: list[str]) -> list[str]:
    """A bare ``--info`` would take the next argument as its choice: make it ``--info=all``."""
    return ["--info=all" if f in ("--info", "-i") else f for f in flags]


def _run_hydra(flags: list[str], overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, open_dict

    from lrft.config import (
        absolute_paths,
        config_dir,
        normalize_overrides,
        register_schemas,
        searchpath_override,
        validate,
    )

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

    from lrft.runs import failed_before_training

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

    cpu = any(o.lower() in ("trainer.cpu=true", "trainer.cpu=1") for o in overrides)
    PartialState(cpu=cpu)  # the process group the run's Accelerator will reuse
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ["LRFT_RUN_STAMP"] = stamp[0]
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def eval_cmd(argv: list[str]) -> int:
    from lrft.evaluate.cli import eval_main

    return eval_main(argv)


def merge_cmd(argv: list[str]) -> int:
    from lrft.merge import merge_main

    return merge_main(argv)


def export_cmd(argv: list[str]) -> int:
    from lrft.export import export_main

    return export_main(argv)


def memory_cmd(argv: list[str]) -> int:
    from lrft.memory.cli import memory_main

    return memory_main(argv)


def plot_cmd(argv: list[str]) -> int:
    from lrft.plots import plot_main

    return plot_main(argv)


def generate_cmd(argv: list[str]) -> int:
    from lrft.generate_cli import generate_main

    return generate_main(argv)


def chat_cmd(argv: list[str]) -> int:
    from lrft.generate_cli import chat_main

    return chat_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_cmd,
    "eval": eval_cmd,
    "merge": merge_cmd,
    "export": export_cmd,
    "memory": memory_cmd,
    "plot": plot_cmd,
    "generate": generate_cmd,
    "chat": chat_cmd,
}


def main(argv: list[str] | None = None) -> int:
    from lrft.quiet import setup, split_verbose

    argv, verbose = split_verbose(sys.argv[1:] if argv is None else argv)
    setup(verbose)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_overview()
        return 0
    if argv[0] in ("--version", "-V"):
        print_versions()
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        console.print(f"[bold red]error:[/] unknown command '{cmd}'.{did_you_mean(cmd, COMMANDS)}")
        return EXIT_USAGE
    try:
        return COMMANDS[cmd](rest)
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE


def entry() -> None:
    sys.exit(main())
