"""GLUE and MMLU metrics, computed directly with numpy (they match scikit-learn and scipy).

:class:`GlueMeter` accumulates them batch by batch for the evaluator; the plain functions take
whole prediction lists. Degenerate inputs (a constant prediction or label vector) give 0.0 instead
of NaN for every correlation, as scikit-learn does for Matthews: a NaN would poison best-checkpoint
comparisons.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from lrft.data.glue import GLUE_TASKS, get_task

Numbers = Sequence[float] | Sequence[int] | np.ndarray

# for picking the best checkpoint: losses and perplexities shrink, everything else grows
LOWER_IS_BETTER = ("loss", "perplexity")


def accuracy(preds: Numbers, labels: Numbers) -> float:
    p, y = _pair(preds, labels)
    return float(np.mean(p == y)) if len(y) else 0.0


def f1_binary(preds: Numbers, labels: Numbers, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there are no true positives (scikit-learn's zero_division)."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def matthews_corrcoef(preds: Numbers, labels: Numbers) -> float:
    """Matthews correlation, multiclass form (Gorodkin's R_K), which reduces to the binary one."""
    p, y = _pair(preds, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (codes[: len(y)], codes[len(y) :]), 1.0)
    return matthews_from_confusion(conf)


def matthews_from_confusion(conf: np.ndarray) -> float:
    """Matthews correlation of a confusion matrix (rows: labels, columns: predictions)."""
    conf = np.asarray(conf, dtype=np.float64)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    n, correct = conf.sum(), np.trace(conf)
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(preds: Numbers, labels: Numbers) -> float:
    p, y = _pair(preds, labels, dtype=np.float64)
    p, y = p - p.mean(), y - y.mean()
    denom = np.sqrt((p @ p) * (y @ y))
    if not len(p) or denom == 0:
        return 0.0
    # the correlation of exactly linear data can round to just past 1
    return float(np.clip((p @ y) / denom, -1.0, 1.0))


def spearman(preds: Numbers, labels: Numbers) -> float:
    p, y = _pair(preds, labels, dtype=np.float64)
    return pearson(rankdata(p), rankdata(y))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy's default method)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # each run of equal values spans [start, end); its members get the mean of ranks start+1..end
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def glue_metrics(task: str, preds: Numbers, labels: Numbers) -> dict[str, float]:
    """The official metrics of a GLUE task (cola: matthews_corrcoef; stsb: pearson, spearmanr;
    mrpc, qqp: accuracy, f1; the others: accuracy)."""
    spec = get_task(task)
    return {name: _METRICS[name](preds, labels) for name in spec.metrics}


def primary_metric(task: str) -> str:
    """The metric a GLUE task is ranked by (the one the LoRA paper reports): Matthews for CoLA,
    Pearson for STS-B, accuracy for the rest."""
    return get_task(task).metrics[0]


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _pair(preds: Numbers, labels: Numbers, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds, dtype=dtype).ravel(), np.asarray(labels, dtype=dtype).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    return p, y


class GlueMeter:
    """The official metrics of a GLUE task, accumulated batch by batch.

    A classification task keeps only its k×k confusion matrix (accuracy, F1 and Matthews are all
    functions of it), so memory does not grow with the number of examples. STS-B keeps the scores
    themselves, 16 bytes an example in two float arrays, because Spearman needs every rank.
    """

    def __init__(self, task: str) -> None:
        self.spec = get_task(task)
        k = self.spec.num_labels
        self.confusion = np.zeros((k, k), dtype=np.int64)  # rows: labels, columns: predictions
        self._preds = array("d")
        self._labels = array("d")

    @property
    def n(self) -> int:
        return len(self._labels) if self.spec.is_regression else int(self.confusion.sum())

    def update(self, preds: Numbers, labels: Numbers) -> None:
        p, y = _pair(preds, labels)
        if self.spec.is_regression:
            self._preds.extend(p.astype(np.float64).tolist())
            self._labels.extend(y.astype(np.float64).tolist())
            return
        k = self.spec.num_labels
        p, y = p.astype(np.int64), y.astype(np.int64)
        if len(p) and (p.min() < 0 or p.max() >= k or y.min() < 0 or y.max() >= k):
            raise ValueError(f"{self.spec.name} classes are 0..{k - 1}; got predictions {p} for labels {y}")
        np.add.at(self.confusion, (y, p), 1)

    def merge(self, other: GlueMeter) -> None:
        """Add another meter's examples (another process's share of the same evaluation)."""
        self.confusion += other.confusion
        self._preds.extend(other._preds)
        self._labels.extend(other._labels)

    def compute(self) -> dict[str, float]:
        if self.spec.is_regression:
            p, y = np.frombuffer(self._preds), np.frombuffer(self._labels)
            found = {"pearson": pearson(p, y), "spearmanr": spearman(p, y)}
        else:
            found = confusion_metrics(self.confusion)
        return {name: found[name] for name in self.spec.metrics}


def confusion_metrics(conf: np.ndarray, positive: int = 1) -> dict[str, float]:
    """Accuracy, F1 of ``positive`` and Matthews from a confusion matrix (rows: labels)."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.sum()
    result = {"accuracy": float(np.trace(conf) / n) if n else 0.0}
    if conf.shape[0] > positive:
        tp = conf[positive, positive]
        fp, fn = conf[:, positive].sum() - tp, conf[positive, :].sum() - tp
        result["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0
    result["matthews_corrcoef"] = matthews_from_confusion(conf)
    return result


def subject_accuracy(
    counts: Mapping[str, tuple[int, int]], category_of: Mapping[str, str | None]
) -> dict[str, object]:
    """MMLU's report from (correct, total) per subject: per-subject accuracy, per-category accuracy
    over the category's questions (as Hendrycks' evaluate.py pools them), ``accuracy`` (micro:
    over all questions) and ``accuracy_macro`` (the mean of the subject accuracies).

    Subjects without a category (not one of the 57) count in the averages, in no category.
    """
    subjects: dict[str, dict[str, object]] = {}
    pooled: dict[str, list[int]] = {}
    for name, (correct, total) in sorted(counts.items()):
        category = category_of.get(name)
        subjects[name] = {
            "accuracy": correct / total if total else 0.0,
            "correct": int(correct),
            "n": int(total),
            "category": category,
        }
        if category is not None and total:
            bucket = pooled.setdefault(category, [0, 0, 0])
            bucket[0] += correct
            bucket[1] += total
            bucket[2] += 1
    answered = [s for s in subjects.values() if s["n"]]
    correct_all = sum(int(s["correct"]) for s in answered)  # type: ignore[call-overload]
    total_all = sum(int(s["n"]) for s in answered)  # type: ignore[call-overload]
    return {
        "accuracy": correct_all / total_all if total_all else 0.0,
        "accuracy_macro": float(np.mean([s["accuracy"] for s in answered])) if answered else 0.0,
        "n": total_all,
        "categories": {
            c: {"accuracy": b[0] / b[1], "n": b[1], "subjects": b[2]} for c, b in sorted(pooled.items())
        },
        "subjects": subjects,
    }


__all__ = [
    "GLUE_TASKS",
    "GlueMeter",
    "accuracy",
    "confusion_metrics",
    "f1_binary",
    "glue_metrics",
    "higher_is_better",
    "matthews_corrcoef",
    "matthews_from_confusion",
    "pearson",
    "primary_metric",
    "rankdata",
    "spearman",
    "subject_accuracy",
]
