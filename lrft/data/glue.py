"""The GLUE tasks: their text columns, label names and official metrics, and label checking."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lrft.errors import UserError, did_you_mean


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task. ``label_names`` is None for regression (STS-B, scores 0..5).

    ``metrics`` lists the official metrics, the primary one (used to pick the best checkpoint) first.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    hub_eval_split: str = "validation"
    label_range: tuple[float, float] = (0.0, 5.0)  # regression only

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_fields, "label")


GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_corrcoef",)),
        TaskSpec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        TaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        TaskSpec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr")),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            hub_eval_split="validation_matched",
        ),
        TaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        TaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    )
}


def get_task(name: str | None) -> TaskSpec:
    """The task spec for a GLUE subset name; a clear error listing valid names otherwise."""
    if name is None:
        raise UserError(f"GLUE data needs dataset.subset (the task).{did_you_mean('', GLUE_TASKS)}")
    key = str(name).lower()
    if key not in GLUE_TASKS:
        raise UserError(f"Unknown GLUE task '{name}'.{did_you_mean(key, GLUE_TASKS)}")
    return GLUE_TASKS[key]


def parse_label(value: Any, spec: TaskSpec) -> int | float | str:
    """A row's label as a class id (or a float for regression), or an error text (a str).

    Accepts the class id, its name, or either as a string (CSV cells are always strings).
    Returning the problem instead of raising lets the caller add the file and row.
    """
    if value is None or value == "":
        return "empty value"
    if isinstance(value, bool):  # bool is an int subclass; true/false are never GLUE labels
        return f"expected a number or a label name, got {value!r}"
    if spec.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            return f"expected a number, got {value!r}"
        low, high = spec.label_range
        if not math.isfinite(score) or not low <= score <= high:
            hint = " (-1 marks the unlabelled GLUE test split)" if score == -1 else ""
            return f"{value!r} is outside [{low:g}, {high:g}]{hint}"
        return score
    names = spec.label_names or ()
    if isinstance(value, str):
        text = value.strip()
        if text in names:
            return names.index(text)
        try:
            value = float(text)
        except ValueError:
            return f"{value!r} is not a label of {spec.name}"
    if isinstance(value, float):
        if not value.is_integer():
            return f"{value!r} is not a class id"
        value = int(value)
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if value == -1:
        return "-1 marks the unlabelled GLUE test split; use a labelled split"
    return f"{value!r} is not a label of {spec.name}"


def label_choices(spec: TaskSpec) -> str:
    if spec.is_regression:
        return f"a number in [{spec.label_range[0]:g}, {spec.label_range[1]:g}]"
    names = spec.label_names or ()
    return ", ".join(f"{i} or '{n}'" for i, n in enumerate(names))


def label_word(label: int | float, spec: TaskSpec) -> str:
    """The text-to-text target for a label: its name, or a score rounded to 0.2 (as T5 does)."""
    if spec.is_regression:
        return "%.1f" % (round(float(label) * 5) / 5)
    return (spec.label_names or ())[int(label)]


def label_words(spec: TaskSpec) -> list[str]:
    """Every target a text-to-text model may have to generate for this task."""
    if spec.is_regression:
        return ["%.1f" % (i / 5) for i in range(int(spec.label_range[1] * 5) + 1)]
    return list(spec.label_names or ())


def parse_generation(text: str, spec: TaskSpec) -> int | float | None:
    """A generated answer mapped back to a label; None when it is not a valid one."""
    text = text.strip()
    if spec.is_regression:
        try:
            score = float(text)
        except ValueError:
            return None
        return score if math.isfinite(score) else None
    lowered = [n.lower() for n in spec.label_names or ()]
    return lowered.index(text.lower()) if text.lower() in lowered else None


def seq2seq_source(row: dict[str, Any], spec: TaskSpec) -> str:
    """The T5 text-to-text input, e.g. ``mrpc sentence1: ... sentence2: ...``."""
    parts = [spec.name] + [f"{field}: {row[field]}" for field in spec.text_fields]
    return " ".join(parts)


def check_glue_row(record: Any, spec: TaskSpec) -> tuple[dict[str, Any] | None, str | None, str]:
    """Normalise one record to the task's text columns + ``label``.

    Returns (row, None, "") when valid, else (None, column, problem) for the caller to report with
    the file and row number.
    """
    if not isinstance(record, dict):
        return None, None, f"expected an object with columns, got {type(record).__name__}"
    row: dict[str, Any] = {}
    for col in spec.text_fields:
        if col not in record:
            return None, col, f"missing column '{col}'"
        if record[col] is None:  # issue 24, finding 10: present, but without a value
            return None, col, f"column '{col}' has no value (null, or a short line)"
        if not isinstance(record[col], str):
            return None, col, f"column '{col}' must be text, got {type(record[col]).__name__}"
        row[col] = record[col]
    if record.get("label") is None:
        return None, "label", "missing column 'label'"
    label = parse_label(record["label"], spec)
    if isinstance(label, str):
        return None, "label", f"column 'label': {label}; valid labels: {label_choices(spec)}"
    row["label"] = label
    return row, None, ""
