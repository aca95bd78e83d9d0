"""``lrft eval``: parse Hydra-style ``key=value`` overrides, assemble the eval config, run it.

A checkpoint brings its own model and dataset (from the run's config.yaml), so ``dataset.*`` keys
given without ``dataset=NAME`` adjust the run's dataset instead of replacing it; likewise
``model.*`` keys without ``model=NAME`` describe a model folder (a merged export) on their own.
Hydra cannot apply keys to a group nobody chose, so those are applied here, against the schema.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lrft.config.compose import compose, group_options
from lrft.errors import EXIT_USAGE, UserError, did_you_mean, one_of
from lrft.evaluate.schema import KEYS_HELP, EvalConfig
from lrft.schema import DATASET_KINDS, TASKS, DatasetConfig, ModelConfig, QuantizationConfig

console = Console(stderr=True, soft_wrap=True)  # never break a path inside an error message
out = Console()

# what lrft eval can score: training's combinations plus two that only make sense for evaluation
EVAL_COMPATIBLE = {
    ("classification", "glue"): "classification head",
    ("seq2seq", "glue"): "generated label word",
    ("causal", "glue"): "label words scored by log-likelihood after a prompt",
    ("seq2seq", "instruction"): "token loss and perplexity on the response",
    ("causal", "instruction"): "token loss and perplexity on the response",
    ("causal", "chat"): "token loss and perplexity on the assistant turns",
    ("causal", "preference"): "a preference run's objective loss and rewards on held-out pairs",
    ("causal", "mmlu"): "k-shot, next-token likelihood of the answer letters",
}
_BY_HAND = {"model": ModelConfig, "dataset": DatasetConfig}
_ARCH_TASKS = (
    ("ForCausalLM", "causal"),
    ("ForSequenceClassification", "classification"),
    ("ForConditionalGeneration", "seq2seq"),
    ("ForSeq2SeqLM", "seq2seq"),
)

EXAMPLES = """\
  lrft eval checkpoint=runs/RUN                        the run's final state on its dataset's eval split
  lrft eval checkpoint=runs/RUN dataset=glue/mnli dataset.data_files.validation=dev_m.jsonl \\
            dataset.data_files.validation_mismatched=dev_mm.jsonl
  lrft eval model=llama7b dataset=mmlu                 a base model, 5-shot MMLU from the hub
  lrft eval model=llama7b dataset=mmlu dataset.data_dir=data/mmlu dataset.shots=0
  lrft eval model.name_or_path=exports/merged dataset=glue/sst2   a merged export"""


def eval_main(argv: list[str]) -> int:
    """``lrft eval [key=value ...] [--cfg job] [--help]``; returns the exit code (2: bad input)."""
    parser = argparse.ArgumentParser(prog="lrft eval", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse already printed what is wrong
        return int(stop.code or 0)
    try:
        if args.help:
            print_help()
            return 0
        cfg = compose_eval(args.overrides)
        if args.cfg:
            out.print(OmegaConf.to_yaml(cfg), markup=False, highlight=False)
            return 0
        from lrft.evaluate.run import run_eval

        run_eval(cfg)
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return EXIT_USAGE
    return 0


def print_help() -> None:
    out.print(
        "[bold]lrft eval[/] [checkpoint=RUN_DIR] [model=NAME] [dataset=NAME] [key=value ...] [--cfg job]\n"
    )
    groups = Table(title="config groups", show_lines=False)
    groups.add_column("group")
    groups.add_column("options")
    for group in ("model", "dataset", "quantization"):
        groups.add_row(group, ", ".join(group_options(group)))
    out.print(groups)
    keys = Table(title="eval keys")
    for col in ("key", "default", "meaning"):
        keys.add_column(col)
    for f in fields(EvalConfig):
        if f.name in KEYS_HELP:
            default = "" if f.default is MISSING else repr(f.default)
            keys.add_row(f.name, default, KEYS_HELP[f.name])
    out.print(keys)
    out.print(
        "dataset.* keys also apply to a checkpoint's own dataset, e.g. dataset.max_eval_samples=100;\n"
        "MMLU: dataset.shots, dataset.data_dir, dataset.subjects=[abstract_algebra,anatomy].\n"
        "Results print as a table and go to OUTPUT_DIR/eval.json.\n\nexamples:",
        markup=False,
        highlight=False,
    )
    out.print(EXAMPLES, markup=False, highlight=False)


def compose_eval(overrides: list[str]) -> DictConfig:
    """The complete eval config: model and dataset filled in (from the checkpoint where not
    chosen) and checked. Raises :class:`UserError` with did-you-mean hints."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:
        raise UserError(f"Cannot parse the overrides {overrides}: {err}") from None
    chosen = {ov.key_or_group for ov in parsed if ov.key_or_group in ("model", "dataset", "quantization")}
    by_hand: dict[str, list[tuple[str, Any, str]]] = {"model": [], "dataset": []}
    keep = []
    for text, ov in zip(overrides, parsed, strict=True):
        top, _, rest = ov.key_or_group.partition(".")
        if rest and top in by_hand and top not in chosen:
            if ov.is_delete() or ov.is_sweep_override():
                raise UserError(f"'{text}': lrft eval takes plain key=value overrides only.")
            by_hand[top].append((rest, ov.value(), text))
        else:
            keep.append(text)
    if any(ov.is_sweep_override() for ov in parsed):
        raise UserError("lrft eval runs one evaluation; sweeps (a=1,2) are for lrft train -m.")
    cfg = as_eval_config(compose(keep, "eval"))
    run_cfg = None
    if cfg.checkpoint:
        if "model" in chosen or by_hand["model"] or "quantization" in chosen:
            raise UserError(
                "checkpoint= evaluates the run's own model: drop the model/quantization overrides "
                "(to evaluate another model, leave checkpoint out)."
            )
        run_cfg = read_run_config(cfg.checkpoint)
    if "model" not in chosen:
        base = run_cfg.model if run_cfg is not None else None
        if base is None and not by_hand["model"]:
            raise UserError(
                "Say what to evaluate: checkpoint=RUN_DIR (a training run), model=NAME "
                f"(one of: {', '.join(group_options('model'))}) or model.name_or_path=DIR."
            )
        cfg.model = _fill_model(apply_keys("model", base, by_hand["model"]))
    if "dataset" not in chosen:
        base = run_cfg.dataset if run_cfg is not None else None
        node = apply_keys("dataset", base, by_hand["dataset"])
        if OmegaConf.is_missing(node, "name") or OmegaConf.is_missing(node, "kind"):
            options = ", ".join(group_options("dataset"))
            raise UserError(f"Choose a dataset: dataset=NAME (one of: {options}).")
        cfg.dataset = node
    if run_cfg is not None and "quantization" in run_cfg:
        cfg.quantization = typed(QuantizationConfig, run_cfg.quantization)
    validate_eval(cfg)
    return cfg


def as_eval_config(cfg: DictConfig) -> DictConfig:
    """The composed config checked against :class:`EvalConfig`'s types (configs/eval.yaml types
    its groups through their schemas; this types the top-level keys, e.g. batch_size=abc)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg)
    except Exception as err:  # OmegaConf's ValidationError names the key
        key = getattr(err, "full_key", None)
        detail = str(err).splitlines()[0]
        raise UserError(
            f"Invalid value for {key}: {detail}" if key else f"Invalid config: {detail}"
        ) from None


def read_run_config(run_dir: str) -> DictConfig:
    """A run's config.yaml, after checking that the run finished (before any model loads)."""
    from lrft.run.final import COMPLETE
    from lrft.run.final import read_run_config as read_config

    path = Path(run_dir).expanduser()
    if path.is_file():  # issue 24, finding 10
        raise UserError(f"checkpoint={run_dir} is a file: give the run folder (it holds config.yaml).")
    if not path.is_dir():
        raise UserError(f"checkpoint={run_dir}: no such run folder.")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not an lrft run folder (no config.yaml).")
    if not (path / "final" / COMPLETE).is_file():
        raise UserError(
            f"{path} has no complete final state ({path / 'final'} missing or unfinished): "
            "the run has not finished. Evaluate a finished run."
        )
    return read_config(path)


def apply_keys(group: str, base: DictConfig | None, keys: list[tuple[str, Any, str]]) -> DictConfig:
    """``base`` (or the group's empty schema) with ``group.key=value`` overrides applied."""
    schema = _BY_HAND[group]
    valid = [f.name for f in fields(schema)]
    node = typed(schema, base)
    for key, value, text in keys:
        leaf = key.split(".")[0]
        if leaf not in valid:
            raise UserError(f"Unknown config key '{group}.{key}'.{did_you_mean(leaf, valid)}")
        try:
            OmegaConf.update(node, key, value, merge=True)
        except Exception as err:  # OmegaConf's validation errors (wrong type, nested typo)
            raise UserError(f"Invalid override '{text}': {str(err).splitlines()[0]}") from None
    return node


def typed(schema: type, base: DictConfig | None) -> DictConfig:
    """``base`` (a run's saved config) as a structured node of ``schema``: missing keys get their
    defaults, and keys an older or newer lrft wrote are dropped rather than fatal."""
    node = OmegaConf.structured(schema)
    if base is None:
        return node
    valid = {f.name for f in fields(schema)}
    return OmegaConf.merge(node, {k: v for k, v in base.items() if k in valid})


def _fill_model(node: DictConfig) -> DictConfig:
    """A model given only by ``model.name_or_path`` (a merged export): name it after its folder
    and read its task from the folder's config.json (or lrft.json)."""
    if OmegaConf.is_missing(node, "task"):
        task = infer_task(node.name_or_path) if node.name_or_path else None
        if task is None:
            raise UserError(
                f"Cannot tell what kind of model '{node.name_or_path}' is: set model.task "
                f"({', '.join(TASKS)}) or choose model=NAME."
            )
        node.task = task
    if OmegaConf.is_missing(node, "name"):
        node.name = Path(str(node.name_or_path or "model")).name
    return node


def infer_task(name_or_path: str) -> str | None:
    folder = Path(name_or_path).expanduser()
    meta = folder / "lrft.json"
    if meta.is_file():
        task = json.loads(meta.read_text()).get("model", {}).get("task")
        if task in TASKS:
            return task
    config = folder / "config.json"
    if config.is_file():
        for arch in json.loads(config.read_text()).get("architectures") or []:
            for suffix, task in _ARCH_TASKS:
                if arch.endswith(suffix):
                    return task
    return None


def validate_eval(cfg: DictConfig) -> None:
    m, d = cfg.model, cfg.dataset
    if OmegaConf.is_missing(m, "task") or m.task is None:  # model=hf: the task comes from the checkpoint
        from lrft.model.resolve import resolve_model_config

        resolve_model_config(cfg)
    one_of("model.task", m.task, TASKS)
    one_of("dataset.kind", d.kind, DATASET_KINDS)
    if (m.task, d.kind) not in EVAL_COMPATIBLE:
        works = "; ".join(f"{t} model + {k} data ({how})" for (t, k), how in EVAL_COMPATIBLE.items())
        raise UserError(
            f"lrft eval cannot score model '{m.name}' ({m.task}) on dataset '{d.name}' ({d.kind}). "
            f"Combinations that work: {works}."
        )
    if not cfg.checkpoint and m.name_or_path is None and m.from_config is None:
        raise UserError(f"model '{m.name}' has neither name_or_path nor from_config: set model.name_or_path.")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}.")
    if cfg.max_samples is not None and cfg.max_samples < 0:
        raise UserError(f"max_samples must be >= 0 or null, got {cfg.max_samples}.")
    if d.kind == "glue":
        from lrft.data.glue import get_task

        get_task(d.subset)
    if d.kind == "mmlu" and d.shots < 0:
        raise UserError(f"dataset.shots must be >= 0, got {d.shots}.")
