"""GLUE metrics, computed directly with numpy (they match scikit-learn and scipy).

Degenerate inputs (a constant prediction or label vector) give 0.0 instead of NaN for every
correlation, as scikit-learn does for Matthews: a NaN would poison best-checkpoint comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = [
    "GLUE_TASKS",
    "accuracy",
    "f1_binary",
    "glue_metrics",
    "higher_is_better",
    "matthews_corrcoef",
    "pearson",
    "primary_metric",
    "rankdata",
    "spearman",
]
