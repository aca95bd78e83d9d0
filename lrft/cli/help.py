"""``--help`` pages rendered from the config schemas: every key, its default and its comment.

The dataclass schemas are the single reference for a command's keys; their inline comments (or the
comment lines just above a field) are the explanations. Any command with a schema gets the same
page from :func:`print_command_help` (``lrft merge --help``, ``lrft export --help``, and a future
``lrft generate --help``). Torch-free: a help page must not cost a model import.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_comments(schema: type) -> dict[str, str]:
    """``{field: comment}`` from the schema's source: the inline comment, else the lines above."""
    comments: dict[str, str] = {}
    for cls in reversed(schema.__mro__):  # a subclass's comment wins over its parent's
        if not is_dataclass(cls):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# ").strip())
                continue
            match = _FIELD.match(line)
            if match and not text.startswith(("def ", "@", '"')):
                name, inline = match.group(1), (match.group(2) or "").strip()
                comment = inline or " ".join(above)
                if comment:
                    comments[name] = comment
            above = []
    return comments


def _show(value: Any) -> str:
    if value == "???":
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def schema_rows(
    schema: type, prefix: str = "", values: Mapping[str, Any] | None = None
) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every leaf key of ``schema``; nested schemas recurse.

    ``values`` (dotted key -> value) replaces the schema's defaults: the effective defaults once
    config files are composed (e.g. the quickstart dataset's own trainer settings).
    """
    values = values or {}
    comments = field_comments(schema)
    rows: list[tuple[str, str, str]] = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        if f.default is not MISSING:
            default: Any = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "???"
        if is_dataclass(default):
            rows += schema_rows(type(default), f"{key}.", values)
            continue
        rows.append((key, _show(values.get(key, default)), comments.get(f.name, "")))
    return rows


def schema_table(title: str, schema: type, prefix: str = "", values: Mapping[str, Any] | None = None) -> Any:
    """A rich table of :func:`schema_rows`; long comments wrap, keys and defaults never do."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("key", no_wrap=True, style="bold cyan")
    table.add_column("default", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    for key, default, comment in schema_rows(schema, prefix, values):
        table.add_row(key, default, comment)
    return table


def print_command_help(name: str, schema: type, usage: str, notes: str = "") -> None:
    """The ``lrft <name> --help`` page: usage, then every key of ``schema`` in one table."""
    from rich.console import Console

    out = Console()
    out.print(f"usage: {usage}\n", highlight=False, markup=False)
    doc = inspect.getdoc(schema)
    if doc and not doc.startswith(schema.__name__ + "("):  # dataclasses invent a signature doc
        out.print(doc + "\n", highlight=False, markup=False)
    out.print(schema_table(f"lrft {name} keys (key=value)", schema))
    if notes:
        out.print(notes, highlight=False, markup=False)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested dict (lists stay values)."""
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for k, v in tree.items():
            flat.update(flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix[:-1]: tree}


def train_defaults() -> tuple[dict[str, str], dict[str, Any]]:
    """What ``lrft train`` with no overrides runs with, read from the YAML files without Hydra:
    (group -> default option, dotted key -> value set by those files over the schemas' defaults).

    The default options' ``@package _global_`` files (the quickstart dataset sets its own trainer
    values) and their own group keys are applied in the defaults-list order, as Hydra composes them;
    tests/test_cli_ux.py checks the result against the real composition.
    """
    import yaml

    from lrft.config.compose import config_dir
    from lrft.schema import GROUPS

    root = config_dir()
    train = yaml.safe_load((root / "train.yaml").read_text()) or {}
    choices: dict[str, str] = {}
    values: dict[str, Any] = {}
    for entry in train.get("defaults", []):
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        ((group, option),) = entry.items()
        if group not in GROUPS or option is None:
            continue
        choices[group] = str(option)
        text = (root / group / f"{option}.yaml").read_text()
        data = yaml.safe_load(text) or {}
        data.pop("defaults", None)
        if "@package _global_" in text.split("\n", 3)[0]:
            values.update(flatten(data))
        else:
            values.update(flatten(data, f"{group}."))
    values.update(flatten({k: v for k, v in train.items() if k not in ("defaults", "hydra")}))
    return choices, values


def print_train_help() -> None:
    """Config groups and every trainer key with its EFFECTIVE default: the one ``lrft train``
    runs with (the default dataset config sets its own trainer values)."""
    from lrft.cli.help import schema_table, train_defaults
    from lrft.config.compose import group_options
    from lrft.schema import GROUPS, TrainerConfig

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
        "Start from a finished run with `lrft train checkpoint=RUN ...`: RUN's final model MERGED (its\n"
        "base with its adapter folded in, as lrft merge does) becomes the new run's base (OUTPUT/base)\n"
        "and a fresh adapter trains on top; not a continuation. With adapters off the model is RUN's\n"
        "model: the DPO/IPO/KTO reference. RUN's model settings are kept (model.dtype, target_modules\n"
        "and quantization may be set).\n"
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


EXAMPLES = """\
  lrft train                                       quickstart: tiny LLaMA, LoRA-FA, bundled data, CPU
  lrft train method=lora_fa model=llama7b dataset=alpaca
  lrft train model=tiny_roberta dataset=glue/sst2 dataset.data_files.train=train.jsonl \\
             dataset.data_files.validation=dev.jsonl
  lrft train model=hf model.name_or_path=DIR dataset=chat dataset.data_files.train=chats.jsonl
  lrft train checkpoint=runs/SFT objective=dpo dataset=preference dataset.data_files.train=pairs.jsonl
  lrft generate checkpoint=runs/RUN prompt="Name three colors"
  lrft train -m method=lora,lora_fa method.r=4,8   sweep: one run folder per job
  lrft train model=llama7b --cfg job               print the composed config and exit"""
