"""Evaluation metrics must agree with scikit-learn, be JSON-safe, and keep val and test apart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr.evaluation import (
    bootstrap_intervals,
    choose_threshold,
    classification_metrics,
    curve_tables,
    expected_calibration_error,
    save_figures,
)

BINS = 10
INTERVAL_KEYS = {"roc_auc", "sensitivity", "specificity", "accuracy"}


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~60% positives and probabilities that carry signal; rounding creates ties
    and values exactly on calibration bin edges."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(int)
    logits = 2 * labels - 1 + rng.normal(size=n)
    return labels, np.round(1 / (1 + np.exp(-logits)), 2)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _synthetic(300, seed=0)


def _sensitivity(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return float(np.mean(probs[labels == 1] >= threshold))


def _youden_j(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    predicted = probs >= threshold
    return float(np.mean(predicted[labels == 1]) - np.mean(predicted[labels == 0]))


# --- classification_metrics ----------------------------------------------------------------


def test_metrics_equal_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    threshold = 0.5
    preds = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, preds).ravel()
    expected = {
        "accuracy": accuracy_score(labels, preds),
        "precision": precision_score(labels, preds),
        "recall": recall_score(labels, preds),
        "sensitivity": recall_score(labels, preds),
        "specificity": tn / (tn + fp),
        "f1": f1_score(labels, preds),
        "roc_auc": roc_auc_score(labels, probs),
        "pr_auc": average_precision_score(labels, probs),
        "brier": brier_score_loss(labels, probs),
        "prevalence": labels.mean(),
    }

    metrics = classification_metrics(labels, probs, threshold, BINS)

    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (tn, fp, fn, tp)
    assert metrics["n"] == labels.size
    assert metrics["ece"] == pytest.approx(expected_calibration_error(labels, probs, BINS), 1e-4)


def test_metrics_are_plain_json_values(data: tuple[np.ndarray, np.ndarray]) -> None:
    metrics = classification_metrics(*data, threshold=0.5, calibration_bins=BINS)
    assert all(type(v) in (float, int) for v in metrics.values())
    assert all(type(metrics[k]) is int for k in ("tn", "fp", "fn", "tp", "n"))
    json.dumps(metrics, allow_nan=False)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_none_not_nan(label: int) -> None:
    labels, probs = np.full(20, label), np.linspace(0.05, 0.95, 20)

    metrics = classification_metrics(labels, probs, threshold=0.5, calibration_bins=BINS)

    assert metrics["roc_auc"] is None and metrics["pr_auc"] is None
    json.dumps(metrics, allow_nan=False)
    json.dumps(bootstrap_intervals(labels, probs, 0.5, resamples=50, seed=0), allow_nan=False)


@pytest.mark.parametrize(
    ("probs", "labels", "expected"),
    [
        ([0.8] * 10, [1] * 8 + [0] * 2, 0.0),  # perfectly calibrated
        ([0.9] * 10, [1] * 5 + [0] * 5, 0.4),  # |0.5 - 0.9|
        ([0.2] * 10 + [0.7] * 10, [1] * 2 + [0] * 8 + [1] * 10, 0.15),  # (10*0 + 10*0.3) / 20
    ],
)
def test_expected_calibration_error_known_cases(
    probs: list[float], labels: list[int], expected: float
) -> None:
    assert expected_calibration_error(labels, probs, BINS) == pytest.approx(expected)


# --- choose_threshold ----------------------------------------------------------------------


def test_fixed_threshold_is_returned_as_is(data: tuple[np.ndarray, np.ndarray]) -> None:
    assert choose_threshold(*data, strategy="fixed", fixed=0.37, target_sensitivity=0.9) == 0.37


def test_youden_matches_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    candidates = np.unique(probs)[::-1]  # highest first, so ties go to the highest threshold
    scores = [_youden_j(labels, probs, t) for t in candidates]
    brute_force = candidates[int(np.argmax(scores))]

    chosen = choose_threshold(labels, probs, "youden", fixed=0.5, target_sensitivity=0.9)

    assert chosen == pytest.approx(brute_force)
    assert _youden_j(labels, probs, chosen) == pytest.approx(max(scores))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_sensitivity_threshold_is_highest_reaching_target(
    data: tuple[np.ndarray, np.ndarray], target: float
) -> None:
    labels, probs = data

    chosen = choose_threshold(labels, probs, "sensitivity", fixed=0.5, target_sensitivity=target)

    assert _sensitivity(labels, probs, chosen) >= target
    higher = probs[probs > chosen]
    if higher.size:  # the next candidate up must miss the target
        assert _sensitivity(labels, probs, higher.min()) < target


def test_sensitivity_target_reached_exactly() -> None:
    labels = np.array([1] * 20 + [0] * 5)
    probs = np.concatenate([np.linspace(0.99, 0.6, 20), np.full(5, 0.1)])

    chosen = choose_threshold(labels, probs, "sensitivity", fixed=0.5, target_sensitivity=0.95)

    assert chosen == pytest.approx(probs[18])  # 19 of 20 positives at or above it


@pytest.mark.parametrize("strategy", ["fixed", "youden", "sensitivity"])
def test_thresholds_lie_in_unit_interval(strategy: str) -> None:
    labels, probs = np.array([1, 0, 1, 0]), np.array([0.2, 0.8, 0.3, 0.9])  # anti-correlated

    chosen = choose_threshold(labels, probs, strategy, fixed=0.5, target_sensitivity=0.9)

    assert 0.0 <= chosen <= 1.0


def test_threshold_rejects_bad_input(data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="unknown threshold strategy"):
        choose_threshold(*data, strategy="median", fixed=0.5, target_sensitivity=0.9)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9], "youden", fixed=0.5, target_sensitivity=0.9)


def test_threshold_depends_on_validation_data_only() -> None:
    """The protocol: the threshold is fitted on val, then frozen and applied to test."""
    val_labels, val_probs = _synthetic(300, seed=1)
    test_labels, test_probs = _synthetic(300, seed=2)
    threshold = choose_threshold(val_labels, val_probs, "youden", 0.5, 0.9)
    before = classification_metrics(test_labels, test_probs, threshold, BINS)

    scrambled = np.random.default_rng(3).permutation(test_labels)
    after = classification_metrics(scrambled, test_probs, threshold, BINS)

    assert choose_threshold(val_labels, val_probs, "youden", 0.5, 0.9) == threshold
    assert after["roc_auc"] < before["roc_auc"] - 0.2
    assert after["accuracy"] != before["accuracy"]


# --- bootstrap_intervals -------------------------------------------------------------------


def test_bootstrap_intervals_contain_point_estimates(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    point = classification_metrics(labels, probs, 0.5, BINS)

    intervals = bootstrap_intervals(labels, probs, 0.5, resamples=500, seed=0)

    assert set(intervals) == INTERVAL_KEYS
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high, name


def test_bootstrap_auc_equals_sklearn_on_same_resamples(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    rows = np.random.default_rng(7).integers(0, labels.size, size=(200, labels.size))
    aucs = [roc_auc_score(labels[r], probs[r]) for r in rows]

    intervals = bootstrap_intervals(labels, probs, 0.5, resamples=200, seed=7)

    assert intervals["roc_auc"] == pytest.approx(np.percentile(aucs, [2.5, 97.5]), abs=1e-5)


def test_bootstrap_is_deterministic_per_seed(data: tuple[np.ndarray, np.ndarray]) -> None:
    first = bootstrap_intervals(*data, threshold=0.5, resamples=200, seed=11)
    assert bootstrap_intervals(*data, threshold=0.5, resamples=200, seed=11) == first
    assert bootstrap_intervals(*data, threshold=0.5, resamples=200, seed=12) != first


def test_bootstrap_intervals_are_wider_for_smaller_samples(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    full = bootstrap_intervals(labels, probs, 0.5, resamples=500, seed=0)
    small = bootstrap_intervals(labels[:60], probs[:60], 0.5, resamples=500, seed=0)

    for name in INTERVAL_KEYS:
        assert small[name][1] - small[name][0] > full[name][1] - full[name][0], name


def test_bootstrap_zero_resamples_is_empty(data: tuple[np.ndarray, np.ndarray]) -> None:
    assert bootstrap_intervals(*data, threshold=0.5, resamples=0, seed=0) == {}


def test_bootstrap_is_fast_at_pipeline_scale() -> None:
    labels, probs = _synthetic(1500, seed=4)
    start = time.perf_counter()
    bootstrap_intervals(labels, probs, 0.5, resamples=1000, seed=0)
    assert time.perf_counter() - start < 5.0


# --- curve_tables --------------------------------------------------------------------------


def test_curve_tables(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    tables = curve_tables(labels, probs, 0.5, BINS)

    roc, pr, calibration, confusion = (tables[k] for k in ("roc", "pr", "calibration", "confusion"))
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["threshold"].between(0, 1).all()
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert list(pr.columns) == ["recall", "precision"]
    assert len(pr) > 2

    assert list(calibration.columns) == ["bin", "mean_predicted", "fraction_positive", "count"]
    assert calibration["count"].sum() == labels.size
    assert (calibration["count"] > 0).all()
    fraction, _ = calibration_curve(labels, probs, n_bins=BINS)
    assert calibration["fraction_positive"].to_numpy() == pytest.approx(fraction)
    # each bin's mean lies inside that bin, so counts line up with calibration_curve's bins
    assert (calibration["mean_predicted"] >= calibration["bin"] / BINS - 1e-12).all()
    assert (calibration["mean_predicted"] <= (calibration["bin"] + 1) / BINS + 1e-12).all()

    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == labels.size
    counts = pd.crosstab(confusion["actual"], confusion["predicted"])
    expected = confusion_matrix(labels, probs >= 0.5)
    names = ["NORMAL", "PNEUMONIA"]
    assert counts.loc[names, names].to_numpy().tolist() == expected.tolist()


# --- save_figures --------------------------------------------------------------------------


def test_save_figures_writes_four_pngs(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    folder = tmp_path / "figures" / "nested"  # does not exist yet

    paths = save_figures(folder, "test", *data, threshold=0.5, calibration_bins=BINS)

    names = ["test_roc.png", "test_pr.png", "test_confusion.png", "test_calibration.png"]
    assert sorted(p.name for p in paths) == sorted(names)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary leftovers
    for path in paths:
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert min(image.size) > 100
