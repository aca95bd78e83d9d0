"""Run one ``lrft eval``: load the model, evaluate each split, print a table, write eval.json."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from lrft.errors import UserError
from lrft.evaluate import mmlu_data
from lrft.evaluate.core import encode_for_eval, evaluate_model
from lrft.evaluate.mmlu import evaluate_mmlu

console = Console(stderr=True)
out = Console()
RESULT_FILE = "eval.json"
_SUBJECT_ROWS = 12  # print per-subject MMLU rows up to this many subjects (all are in eval.json)


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate what ``cfg`` (from :func:`lrft.cli.eval.compose_eval`) names; returns the
    record written to ``output_dir/eval.json``."""
    started, tick = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    _seed(int(cfg.seed))
    d, task = cfg.dataset, cfg.model.task
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    # data first: a bad file or split should fail before a large model is loaded
    if d.kind == "mmlu":
        split = mmlu_data.split_name(cfg.split or d.eval_split)
        data = mmlu_data.load(d, split, cfg.max_samples)
    else:
        from lrft.data import load_rows

        splits = [(name, one, load_rows(one, which)) for name, one, which in resolve_splits(d, cfg, notes)]
    model, tokenizer = load_for_eval(cfg)
    objective = None  # preference pairs are scored with the run's own objective (its loss, rewards)
    if cfg.checkpoint:
        from lrft.run.final import read_run_config

        objective = read_run_config(cfg.checkpoint).get("objective")
    device = place(model, str(cfg.device))
    with _Progress(bool(cfg.progress)) as progress:
        if d.kind == "mmlu":
            progress.start(f"mmlu {split}", sum(len(qs) for _, qs in data.values()))
            report = evaluate_mmlu(
                model, tokenizer, d, split, cfg.batch_size, None, cfg.reuse_prefix, progress.advance, data
            )
            results[split] = _mmlu_entry(report)
            shots = report["shots"]
            if shots["questions_with_fewer"]:
                notes.append(
                    f"{shots['questions_with_fewer']} prompts exceeded the context and dropped "
                    f"{shots['dropped']} shots in all"
                )
            if shots["truncated"]:
                notes.append(f"{shots['truncated']} prompts did not fit even 0-shot and lost their start")
        else:
            for name, one, rows in splits:
                examples = encode_for_eval(rows, one, task, tokenizer)
                progress.start(name, len(examples))
                metrics = evaluate_model(
                    model,
                    tokenizer,
                    examples,
                    one,
                    task,
                    cfg.batch_size,
                    device,
                    progress.advance,
                    objective=objective,
                )
                results[name] = {"n": metrics.pop("n"), "metrics": metrics}
                if metrics.get("truncated"):
                    notes.append(f"{name}: {metrics['truncated']} prompts were cut to dataset.max_length")
    record = {
        "checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()) if cfg.checkpoint else None,
        "model": {k: cfg.model[k] for k in ("name", "name_or_path", "task")},
        "dataset": _dataset_info(d),
        "splits": list(results),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "max_samples": cfg.max_samples,
        "n": sum(int(r["n"]) for r in results.values()),
        "results": results,
        "notes": notes,
        "started": started,
        "seconds": round(time.perf_counter() - tick, 3),
        "lrft_version": _version(),
    }
    path = write_record(record, output_dir(cfg))
    print_table(record, path)
    return record


def load_for_eval(cfg: DictConfig) -> tuple[nn.Module, Any]:
    """The run's final model (``checkpoint``) or the configured model, and its tokenizer."""
    from lrft.data.glue import get_task

    d = cfg.dataset
    if cfg.checkpoint:
        from lrft.run.final import load_run, read_run_config

        if cfg.model.task == "classification":  # before loading: the run's head is its dataset's
            from lrft.data import num_labels

            run_cfg = read_run_config(cfg.checkpoint)
            _check_head(num_labels(run_cfg.dataset), d.subset)
        run = load_run(Path(cfg.checkpoint).expanduser())
        model, tokenizer = run.model, run.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        from lrft.model.load import load_model, load_tokenizer

        labels = get_task(d.subset).num_labels if cfg.model.task == "classification" else None
        saved = Path(str(cfg.model.name_or_path)).expanduser() / "config.json"
        if labels is not None and saved.is_file():  # a trained head (merged export) keeps its size
            id2label = json.loads(saved.read_text()).get("id2label")
            _check_head(len(id2label) if id2label else 2, d.subset)  # 2: transformers' default
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, num_labels=labels, qcfg=cfg.quantization)
    if cfg.model.task == "classification":
        _check_head(getattr(model.config, "num_labels", None), d.subset)
    return model, tokenizer


def _check_head(outputs: int | None, task: str) -> None:
    from lrft.data.glue import get_task

    if outputs != get_task(task).num_labels:
        raise UserError(
            f"The model's classification head has {outputs} outputs but {task} needs "
            f"{get_task(task).num_labels}: evaluate a classifier on a task with its label set."
        )


def place(model: nn.Module, device: str) -> torch.device:
    """Move the model to ``device`` (auto: cuda if present); a model spread by a device map, or
    quantized, stays where it is. Returns where inputs go."""
    quantized = any(
        getattr(model, a, None) for a in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit")
    )
    if getattr(model, "hf_device_map", None) or quantized:  # bitsandbytes placed it when loading
        return model.get_input_embeddings().weight.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
        model.to(target)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device={device}: {err}") from None
    return target


def resolve_splits(d: DictConfig, cfg: DictConfig, notes: list[str]) -> list[tuple[str, DictConfig, str]]:
    """``(name, dataset config for it, load_rows split)`` for each split to evaluate.

    Default: the dataset's eval split, and for MNLI both matched and mismatched. Local files are
    the ``dataset.data_files`` keys (train, validation, validation_mismatched); anything else is a
    hub split name.
    """
    split, max_samples = cfg.split, cfg.max_samples
    files = d.data_files
    local = any(files[k] for k in files)
    mnli = d.kind == "glue" and d.subset == "mnli"
    if split is None:
        names = ["validation_matched", "validation_mismatched"] if mnli else [d.eval_split]
        if mnli and local and not files.validation_mismatched:
            names = names[:1]
            notes.append("validation_mismatched skipped: set dataset.data_files.validation_mismatched=FILE")
    else:
        names = [split]
    out = []
    for name in names:
        one = d.copy()
        which = "train" if name == "train" else "eval"  # "train" means the training split
        if local:
            key = {"train": "train", "validation_mismatched": "validation_mismatched"}.get(name, "validation")
            known = ("train", "validation", "validation_matched", "validation_mismatched", d.eval_split)
            held_out = key == "validation" and not files[key] and files.train  # rows held out of train
            if name not in known or not (files[key] or held_out):
                have = [k for k in files if files[k]]
                raise UserError(
                    f"dataset '{d.name}' has no '{name}' split: its local files are "
                    f"{', '.join(f'data_files.{k}' for k in have)}; set dataset.data_files.{key}=FILE."
                )
            one.data_files.validation = files[key]
        elif which == "eval":
            one.eval_split = name
        if max_samples is not None:
            one["max_train_samples" if which == "train" else "max_eval_samples"] = max_samples
        out.append((name, one, which))
    return out


def output_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    if cfg.checkpoint:
        return Path(cfg.checkpoint).expanduser()
    base = Path("eval") / time.strftime("%Y-%m-%d_%H-%M-%S")
    path, n = base, 1
    while path.exists():  # two evaluations in the same second keep both results
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_record(record: dict[str, Any], folder: Path) -> Path:
    """eval.json, written to a temporary name first so a crash never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULT_FILE
    tmp = folder / f".{RESULT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(_finite(record), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(record: dict[str, Any], path: Path) -> None:
    what = record["checkpoint"] or record["model"]["name_or_path"] or record["model"]["name"]
    table = Table(title=f"{what} on {record['dataset']['name']}")
    for col, justify in (("split", "left"), ("metric", "left"), ("value", "right"), ("n", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for split, result in record["results"].items():
        for name, value in result["metrics"].items():
            table.add_row(split, name, _fmt(value), str(result["n"]))
        for name, cat in result.get("categories", {}).items():
            table.add_row(split, f"accuracy: {name}", _fmt(cat["accuracy"]), str(cat["n"]))
        subjects = result.get("subjects", {})
        if len(subjects) <= _SUBJECT_ROWS:
            for name, sub in subjects.items():
                table.add_row(split, f"accuracy: {name}", _fmt(sub["accuracy"]), str(sub["n"]))
    out.print(table)
    for note in record["notes"]:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)
    done = f"{record['n']} examples in {record['seconds']:.1f}s; results in {path}"
    out.print(done, highlight=False, soft_wrap=True)  # soft: a wrapped path cannot be pasted


def _mmlu_entry(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "n": report["n"],
        "metrics": {"accuracy": report["accuracy"], "accuracy_macro": report["accuracy_macro"]},
        "categories": report["categories"],
        "subjects": report["subjects"],
        "shots": report["shots"],
        "scoring": report["scoring"],
    }


def _dataset_info(d: DictConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"name": d.name, "kind": d.kind, "subset": d.subset}
    if d.kind == "mmlu":
        info.update(source=d.data_dir or d.path, shots=int(d.shots), subjects=d.subjects and list(d.subjects))
    else:
        files = OmegaConf.to_container(d.data_files)
        info["source"] = {k: v for k, v in files.items() if v} or d.path  # type: ignore[union-attr]
    return info


def _finite(value: Any) -> Any:
    """NaN/inf -> None: JSON has no such numbers and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _version() -> str:
    from lrft import __version__

    return __version__


class _Progress:
    """A progress bar per split on stderr; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("[bold]eval {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, name: str, total: int) -> None:
        self.task = self.bar.add_task(name, total=total)

    def advance(self, done: float) -> None:
        self.bar.advance(self.task, done)
