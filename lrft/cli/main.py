"""``lrft`` command line: subcommands dispatch to Hydra-composed plain functions; no logic here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lrft.cli.help import EXAMPLES, print_versions
from lrft.errors import EXIT_USAGE, UserError, did_you_mean

console = Console(stderr=True)
out = Console()


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


# command -> (module, function): each imported only when its command runs, so ``lrft --help``
# and a mistyped command answer without importing Hydra, torch or any other command
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lrft.cli.train", "train_cmd"),
    "eval": ("lrft.cli.eval", "eval_main"),
    "merge": ("lrft.cli.merge", "merge_main"),
    "export": ("lrft.cli.export", "export_main"),
    "memory": ("lrft.cli.memory", "memory_main"),
    "plot": ("lrft.cli.plot", "plot_main"),
    "generate": ("lrft.cli.generate", "generate_main"),
    "chat": ("lrft.cli.generate", "chat_main"),
}


def command(name: str) -> Callable[[list[str]], int]:
    module, function = COMMANDS[name]
    return getattr(import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    from lrft.cli.quiet import setup, split_verbose

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
        return command(cmd)(rest)
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE


def entry() -> None:
    sys.exit(main())
