import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from lrft.errors import UserError
from lrft.evaluate.metrics import (
    GlueMeter,
    accuracy,
    confusion_metrics,
    f1_binary,
    glue_metrics,
    higher_is_better,
    matthews_corrcoef,
    pearson,
    primary_metric,
    rankdata,
    spearman,
    subject_accuracy,
)

TOL = 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=TOL)
    assert f1_binary(p, y) == pytest.approx(skm.f1_score(y, p), abs=TOL)
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_matthews_and_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 3, size=150)
    p = np.where(rng.random(150) < 0.5, y, rng.integers(0, 3, size=150))
    assert matthews_corrcoef(p.tolist(), y.tolist()) == pytest.approx(skm.matthews_corrcoef(y, p), abs=TOL)
    assert accuracy(list(p), list(y)) == pytest.approx(skm.accuracy_score(y, p), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(200 + seed)
    y = rng.uniform(0, 5, size=100)
    p = y + rng.normal(0, 1.5, size=100)
    assert pearson(p, y) == pytest.approx(stats.pearsonr(p, y)[0], abs=TOL)
    assert spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0], abs=TOL)


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(7)
    y = np.round(rng.uniform(0, 5, size=120) * 5) / 5  # STS-B-like scores, many ties
    p = np.round(y + rng.normal(0, 1, size=120))
    assert spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0], abs=TOL)
    np.testing.assert_allclose(rankdata(p), stats.rankdata(p), atol=TOL)


def test_degenerate_inputs_give_zero_not_nan():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0
    assert f1_binary([0, 0], [1, 0]) == 0.0
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])


@pytest.mark.parametrize(
    ("task", "keys", "primary"),
    [
        ("cola", {"matthews_corrcoef"}, "matthews_corrcoef"),
        ("sst2", {"accuracy"}, "accuracy"),
        ("mrpc", {"accuracy", "f1"}, "accuracy"),
        ("qqp", {"accuracy", "f1"}, "accuracy"),
        ("stsb", {"pearson", "spearmanr"}, "pearson"),
        ("mnli", {"accuracy"}, "accuracy"),
        ("qnli", {"accuracy"}, "accuracy"),
        ("rte", {"accuracy"}, "accuracy"),
    ],
)
def test_glue_metric_sets(task, keys, primary):
    preds, labels = ([0.5, 2.0, 4.5], [1.0, 2.5, 4.0]) if task == "stsb" else ([0, 1, 1], [0, 1, 0])
    result = glue_metrics(task, preds, labels)
    assert set(result) == keys
    assert all(isinstance(v, float) for v in result.values())
    assert primary_metric(task) == primary
    assert primary in result


def test_glue_metrics_values():
    assert glue_metrics("mrpc", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})


def test_unknown_task_lists_valid_ones():
    with pytest.raises(UserError, match=r"Unknown GLUE task 'colaa'.*cola"):
        glue_metrics("colaa", [0], [0])
    with pytest.raises(UserError, match="Valid: cola, mnli"):
        primary_metric("squad")


def test_higher_is_better():
    assert higher_is_better("accuracy") and higher_is_better("matthews_corrcoef")
    assert not higher_is_better("loss") and not higher_is_better("perplexity")


# --- streaming meters -----------------------------------------------------------------------------


def _in_batches(meter: GlueMeter, preds, labels, size: int) -> dict[str, float]:
    for start in range(0, len(labels), size):
        meter.update(preds[start : start + size], labels[start : start + size])
    return meter.compute()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("task", ["mrpc", "qqp", "cola", "sst2"])
def test_meter_binary_matches_sklearn_batch_by_batch(task, seed):
    rng = np.random.default_rng(300 + seed)
    y = rng.integers(0, 2, size=257)
    p = np.where(rng.random(257) < 0.65, y, 1 - y)
    got = _in_batches(GlueMeter(task), p.tolist(), y.tolist(), size=10)
    expected = {
        "accuracy": skm.accuracy_score(y, p),
        "f1": skm.f1_score(y, p),
        "matthews_corrcoef": skm.matthews_corrcoef(y, p),
    }
    assert got == pytest.approx({k: expected[k] for k in got}, abs=TOL)
    assert got == pytest.approx(glue_metrics(task, p, y), abs=TOL)


def test_meter_mnli_three_classes_and_flat_state():
    rng = np.random.default_rng(11)
    meter = GlueMeter("mnli")
    y = rng.integers(0, 3, size=5000)
    p = np.where(rng.random(5000) < 0.5, y, rng.integers(0, 3, size=5000))
    got = _in_batches(meter, p, y, size=64)
    assert got == pytest.approx({"accuracy": skm.accuracy_score(y, p)}, abs=TOL)
    assert meter.confusion.shape == (3, 3) and meter.n == 5000  # memory does not grow with n
    assert confusion_metrics(meter.confusion)["matthews_corrcoef"] == pytest.approx(
        skm.matthews_corrcoef(y, p), abs=TOL
    )


@pytest.mark.parametrize("seed", range(3))
def test_meter_stsb_matches_scipy(seed):
    rng = np.random.default_rng(400 + seed)
    y = np.round(rng.uniform(0, 5, size=203) * 5) / 5
    p = y + rng.normal(0, 1.2, size=203)
    got = _in_batches(GlueMeter("stsb"), p, y, size=16)
    assert got["pearson"] == pytest.approx(stats.pearsonr(p, y)[0], abs=TOL)
    assert got["spearmanr"] == pytest.approx(stats.spearmanr(p, y)[0], abs=TOL)


def test_meter_edge_cases():
    empty = GlueMeter("mrpc").compute()
    assert empty == {"accuracy": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match=r"classes are 0\.\.1"):
        GlueMeter("sst2").update([2], [1])
    constant = GlueMeter("cola")
    constant.update([1, 1, 1], [0, 1, 0])
    assert constant.compute() == {"matthews_corrcoef": 0.0}


def test_subject_accuracy_micro_macro_and_categories():
    counts = {"abstract_algebra": (3, 4), "college_physics": (1, 4), "sociology": (2, 2), "custom": (0, 2)}
    categories = {"abstract_algebra": "STEM", "college_physics": "STEM", "sociology": "social sciences"}
    report = subject_accuracy(counts, categories)
    assert report["accuracy"] == pytest.approx(6 / 12)  # micro: every question weighs the same
    assert report["accuracy_macro"] == pytest.approx((0.75 + 0.25 + 1.0 + 0.0) / 4)
    assert report["n"] == 12
    assert report["categories"] == {
        "STEM": {"accuracy": 0.5, "n": 8, "subjects": 2},
        "social sciences": {"accuracy": 1.0, "n": 2, "subjects": 1},
    }
    assert report["subjects"]["custom"] == {"accuracy": 0.0, "correct": 0, "n": 2, "category": None}
    assert subject_accuracy({}, {})["accuracy"] == 0.0
