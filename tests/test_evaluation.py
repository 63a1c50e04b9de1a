"""Evaluation metrics must agree with scikit-learn, be JSON-safe, and keep val and test apart."""

from __future__ import annotations

import ast
import importlib.util
import json
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
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr.classifier import probability_from_logit
from cxr.evaluation import (
    TEMPERATURE_BOUNDS,
    accuracy_picked_threshold,
    bootstrap_intervals,
    choose_threshold,
    classification_metrics,
    curve_tables,
    expected_calibration_error,
    fit_temperature,
    probability_scores,
    specificity_at_sensitivity,
)
from cxr.metric_figures import save_figures
from cxr.trainer import save_history_figure

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


def _one_image_each(labels: np.ndarray) -> np.ndarray:
    """Patient ids when every image comes from a different patient."""
    return np.arange(labels.size)


def _patients(labels: np.ndarray, seed: int) -> np.ndarray:
    """Ids like the manifest's ("NORMAL/person7"), 1 to 3 consecutive images per patient."""
    sizes = np.random.default_rng(seed).integers(1, 4, size=labels.size)
    owner = np.repeat(np.arange(labels.size), sizes)[: labels.size]
    return np.array([f"{'PNEUMONIA' if labels[o] else 'NORMAL'}/person{o}" for o in owner])


def _reference_intervals(
    labels: np.ndarray, probs: np.ndarray, rows: list[np.ndarray], threshold: float
) -> dict[str, list[float]]:
    """The obvious bootstrap: each resample's images listed out, scored with scikit-learn."""
    samples: dict[str, list[float]] = {name: [] for name in INTERVAL_KEYS}
    for r in rows:
        y, p = labels[r], probs[r]
        predicted = (p >= threshold).astype(int)
        samples["roc_auc"].append(roc_auc_score(y, p))
        samples["sensitivity"].append(recall_score(y, predicted))
        samples["specificity"].append(recall_score(y, predicted, pos_label=0))
        samples["accuracy"].append(accuracy_score(y, predicted))
    return {name: list(np.percentile(v, [2.5, 97.5])) for name, v in samples.items()}


def _width(interval: list[float]) -> float:
    return interval[1] - interval[0]


def _sensitivity(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return float(np.mean(probs[labels == 1] >= threshold))


def _youden_j(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    predicted = probs >= threshold
    return float(np.mean(predicted[labels == 1]) - np.mean(predicted[labels == 0]))


def _brute_force_specificity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The best specificity of any threshold (each distinct score) whose sensitivity reaches
    the target, counted image by image."""
    reaching = [t for t in np.unique(probs) if _sensitivity(labels, probs, t) >= target]
    return max(float(np.mean(probs[labels == 0] < t)) for t in reaching)


def _mean_log_loss(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """scikit-learn's log loss of sigmoid(logit / T): a reference the fit does not share."""
    return float(log_loss(labels, 1 / (1 + np.exp(-logits / temperature)), labels=[0, 1]))


def _well_calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from sigmoid(logit): calibrated by construction (T = 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(int)
    return labels, logits


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
        "log_loss": log_loss(labels, probs),
        "specificity_at_95_sensitivity": _brute_force_specificity(labels, probs, 0.95),
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
    assert metrics["specificity_at_95_sensitivity"] is None
    assert metrics["log_loss"] is not None  # defined: every image has a probability
    json.dumps(metrics, allow_nan=False)
    intervals = bootstrap_intervals(labels, probs, _one_image_each(labels), 0.5, 50, seed=0)
    missing_rate = "sensitivity" if label == 0 else "specificity"
    assert intervals["roc_auc"] == intervals[missing_rate] == [None, None]
    json.dumps(intervals, allow_nan=False)


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


@pytest.mark.parametrize("seed", range(5))
def test_specificity_at_95_sensitivity_matches_brute_force(seed: int) -> None:
    labels, probs = _synthetic(200 + 37 * seed, seed)  # rounded: ties and repeated scores

    chosen = specificity_at_sensitivity(labels, probs, 0.95)

    assert chosen == pytest.approx(_brute_force_specificity(labels, probs, 0.95))


def test_specificity_at_sensitivity_keeps_points_on_a_straight_stretch_of_the_curve() -> None:
    """16 positives on top, then 4 scores each shared by one positive and one negative (a
    straight diagonal that roc_curve's drop_intermediate thins to its ends), then 16 negatives.
    19 of 20 positives are reached 3 ties down, with 3 false positives: specificity 17/20."""
    ties = np.array([0.5, 0.45, 0.4, 0.35])
    probs = np.concatenate([np.linspace(0.99, 0.6, 16), ties, ties, np.linspace(0.3, 0.01, 16)])
    labels = np.array([1] * 16 + [1] * 4 + [0] * 4 + [0] * 16)

    assert specificity_at_sensitivity(labels, probs, 0.95) == pytest.approx(17 / 20)
    assert _brute_force_specificity(labels, probs, 0.95) == pytest.approx(17 / 20)


def test_probability_scores_are_those_of_classification_metrics(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    scores = probability_scores(labels, probs, BINS)
    metrics = classification_metrics(labels, probs, 0.5, BINS)
    assert scores == {name: metrics[name] for name in ("brier", "log_loss", "ece")}


# --- fit_temperature -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1 / 3, 1.0, 3.0])
def test_temperature_undoes_a_known_scaling_of_calibrated_logits(scale: float) -> None:
    labels, logits = _well_calibrated(20_000, seed=1)

    temperature = fit_temperature(labels, scale * logits)

    assert temperature == pytest.approx(scale, rel=0.05)
    calibrated = probability_from_logit(scale * logits, temperature)
    before = expected_calibration_error(labels, probability_from_logit(scale * logits, 1.0), BINS)
    after = expected_calibration_error(labels, calibrated, BINS)
    assert after < 0.015
    if scale != 1.0:
        assert before > 0.05  # a visibly over- or under-confident model, made honest


@pytest.mark.parametrize("seed", range(3))
def test_temperature_minimizes_log_loss_as_a_grid_search_does(seed: int) -> None:
    labels, logits = _well_calibrated(300, seed)
    logits = 2.0 * logits + np.random.default_rng(seed).normal(0, 1, logits.size)  # noisy
    grid = np.exp(np.linspace(np.log(0.1), np.log(10), 4001))  # steps of 0.12%
    z = logits / grid[:, np.newaxis]  # every temperature at once: log loss = softplus(z) - y z
    losses = np.mean(np.logaddexp(0.0, z) - labels * z, axis=1)
    best = grid[int(np.argmin(losses))]
    assert losses.min() == pytest.approx(_mean_log_loss(labels, logits, best), rel=1e-9)

    temperature = fit_temperature(labels, logits)

    assert temperature == pytest.approx(best, rel=3e-3)
    assert _mean_log_loss(labels, logits, temperature) <= min(losses) + 1e-9


def test_temperature_stops_at_its_bounds_on_separable_data() -> None:
    """Perfectly separated validation logits have no finite optimum: sharper is always better."""
    labels = np.array([0] * 10 + [1] * 10)
    logits = np.concatenate([np.linspace(-3, -1, 10), np.linspace(1, 3, 10)])
    assert fit_temperature(labels, logits) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert fit_temperature(1 - labels, logits) == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3)


def test_temperature_rejects_input_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1, 1, 1], [0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([0, 1], [0.0, np.inf])
    with pytest.raises(ValueError, match="2 labels for 3 logits"):
        fit_temperature([0, 1], [0.0, 1.0, 2.0])


def test_probability_from_logit_divides_by_the_temperature() -> None:
    logits = np.array([-50.0, -2.0, 0.0, 0.7, 3.0, 50.0], dtype=np.float32)
    for temperature in (0.5, 1.0, 2.5):
        expected = 1 / (1 + np.exp(-logits.astype(float) / temperature))
        np.testing.assert_allclose(probability_from_logit(logits, temperature), expected, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        probability_from_logit(logits, 0.0)


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


def test_youden_middle_takes_the_middle_of_the_plateau_in_logit_space() -> None:
    # Separable scores: every threshold in (0.1, 0.9] gives J = 1, and Youden takes the edge
    # that is a score, 0.9. With no tolerance the plateau's candidates are that one score.
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.01, 0.05, 0.1, 0.9, 0.95, 0.99])
    assert choose_threshold(labels, probs, "youden", 0.5, 0.9) == pytest.approx(0.9)
    assert choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, 0.0) == pytest.approx(0.9)
    # One negative may be lost: J = 2/3 at 0.1 is outside a tolerance of 0.1, inside 0.4.
    assert choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, 0.1) == pytest.approx(0.9)
    # J >= 0.6 at 0.1 (2/3), 0.9 (1) and 0.95 (2/3): the middle of logit(0.1) and logit(0.95).
    middle = choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, 0.4)
    assert middle == pytest.approx(1 / (1 + (0.9 / 0.1 * 0.05 / 0.95) ** 0.5))
    assert _youden_j(labels, probs, middle) == 1.0


def test_youden_middle_keeps_a_one_point_optimum_through_the_logit_round_trip() -> None:
    # The one positive scores 0.87, above every negative but 0.85: J = 1 at 0.87 alone.
    labels = np.array([0, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.62, 0.87, 0.35, 0.85, 0.38, 0.71, 0.11])
    chosen = choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, 0.0)
    assert _youden_j(labels, probs, chosen) == 1.0


def test_youden_middle_stays_in_the_unbroken_run_around_the_best() -> None:
    # J = 1/3 at 0.9 and at 0.5 but less at the scores between: two islands, not one plateau.
    labels = np.array([1, 0, 0, 1, 1, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    js = [_youden_j(labels, probs, t) for t in probs]
    assert js[0] == pytest.approx(js[4]) and max(js[1:4]) < js[0] - 0.3  # the constructed dip
    chosen = choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, 0.01)
    assert _youden_j(labels, probs, chosen) == pytest.approx(max(js))


@pytest.mark.parametrize("tolerance", [0.0, 0.02, 0.1, 0.3])
def test_youden_middle_is_near_optimal_on_many_small_validation_sets(tolerance: float) -> None:
    """Property: whatever the scores (ties, few images, one class rare), the chosen threshold's
    J under the project's own `probs >= threshold` is within the tolerance of the best J."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 30))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]  # both classes
        probs = rng.random(n).round(int(rng.integers(1, 4)))  # coarse scores make ties
        probs = np.clip(probs + 0.3 * labels * rng.random(), 0, 1)
        best = max(_youden_j(labels, probs, t) for t in [*probs, np.inf])
        chosen = choose_threshold(labels, probs, "youden_middle", 0.5, 0.9, tolerance)
        assert _youden_j(labels, probs, chosen) >= best - tolerance - 1e-12, (labels, probs)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("fixed", 0.5),
        # Every finite threshold has J < 0, so the best is to call nothing positive: roc_curve's
        # infinite first threshold, reported as the next number above the top score.
        ("youden", np.nextafter(0.9, 1)),
        ("sensitivity", 0.2),  # only the lowest score catches both positives
    ],
)
def test_thresholds_on_anti_correlated_scores(strategy: str, expected: float) -> None:
    labels, probs = np.array([1, 0, 1, 0]), np.array([0.2, 0.8, 0.3, 0.9])

    chosen = choose_threshold(labels, probs, strategy, fixed=0.5, target_sensitivity=0.9)

    assert chosen == expected


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

    intervals = bootstrap_intervals(labels, probs, _patients(labels, 0), 0.5, 500, seed=0)

    assert set(intervals) == INTERVAL_KEYS
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high, name


def test_one_image_per_patient_is_the_image_bootstrap(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    rows = np.random.default_rng(7).integers(0, labels.size, size=(200, labels.size))

    intervals = bootstrap_intervals(labels, probs, _one_image_each(labels), 0.5, 200, seed=7)

    expected = _reference_intervals(labels, probs, list(rows), 0.5)
    for name in INTERVAL_KEYS:
        assert intervals[name] == pytest.approx(expected[name], abs=1e-5), name


def test_cluster_bootstrap_takes_all_images_of_each_drawn_patient(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    groups = _patients(labels, seed=1)
    names, first = np.unique(groups, return_index=True)
    patients = names[np.argsort(first)]  # numbered in order of first appearance
    images_of = [np.flatnonzero(groups == patient) for patient in patients]
    drawn = np.random.default_rng(5).integers(0, patients.size, size=(200, patients.size))
    rows = [np.concatenate([images_of[p] for p in resample]) for resample in drawn]

    intervals = bootstrap_intervals(labels, probs, groups, 0.5, 200, seed=5)

    assert patients.size < labels.size  # some patients have several images
    expected = _reference_intervals(labels, probs, rows, 0.5)
    for name in INTERVAL_KEYS:
        assert intervals[name] == pytest.approx(expected[name], abs=1e-5), name


def test_duplicated_images_do_not_narrow_the_cluster_interval(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    """Four identical films of each patient carry no more information than one."""
    labels, probs = data
    copies = 4
    patients = np.repeat(_one_image_each(labels), copies)
    labels4, probs4 = np.repeat(labels, copies), np.repeat(probs, copies)

    once = bootstrap_intervals(labels, probs, _one_image_each(labels), 0.5, 500, seed=3)
    clustered = bootstrap_intervals(labels4, probs4, patients, 0.5, 500, seed=3)
    naive = bootstrap_intervals(labels4, probs4, _one_image_each(labels4), 0.5, 500, seed=3)

    for name in INTERVAL_KEYS:
        assert clustered[name] == pytest.approx(once[name], abs=1e-5), name
        # Resampling the copies as if independent shrinks the width by about sqrt(4) = 2.
        assert _width(clustered[name]) > 1.5 * _width(naive[name]), name


def test_patient_ids_may_be_any_hashable(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    groups = _patients(labels, seed=2)
    numbered = {name: i for i, name in enumerate(dict.fromkeys(groups))}
    as_ints = [numbered[g] for g in groups]
    as_tuples = [tuple(g.split("/")) for g in groups]

    expected = bootstrap_intervals(labels, probs, groups, 0.5, 100, seed=0)

    assert bootstrap_intervals(labels, probs, as_ints, 0.5, 100, seed=0) == expected
    assert bootstrap_intervals(labels, probs, as_tuples, 0.5, 100, seed=0) == expected
    assert bootstrap_intervals(labels, probs, pd.Series(groups), 0.5, 100, seed=0) == expected


def test_bootstrap_rejects_ids_that_do_not_match_the_images(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    with pytest.raises(ValueError, match=f"{labels.size - 1} patient ids for {labels.size}"):
        bootstrap_intervals(labels, probs, _one_image_each(labels)[1:], 0.5, 10, seed=0)
    missing = [None, *_one_image_each(labels)[1:]]
    with pytest.raises(ValueError, match="missing"):
        bootstrap_intervals(labels, probs, missing, 0.5, 10, seed=0)


def test_bootstrap_is_deterministic_per_seed(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    groups = _patients(labels, seed=0)
    first = bootstrap_intervals(labels, probs, groups, 0.5, 200, seed=11)
    assert bootstrap_intervals(labels, probs, groups, 0.5, 200, seed=11) == first
    assert bootstrap_intervals(labels, probs, groups, 0.5, 200, seed=12) != first


def test_bootstrap_intervals_are_wider_for_smaller_samples(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, probs = data
    groups = _patients(labels, seed=0)
    full = bootstrap_intervals(labels, probs, groups, 0.5, 500, seed=0)
    small = bootstrap_intervals(labels[:60], probs[:60], groups[:60], 0.5, 500, seed=0)

    for name in INTERVAL_KEYS:
        assert _width(small[name]) > _width(full[name]), name


def test_bootstrap_zero_resamples_is_empty(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    assert bootstrap_intervals(labels, probs, _one_image_each(labels), 0.5, 0, seed=0) == {}


# --- curve_tables --------------------------------------------------------------------------


def test_curve_tables_on_a_known_case() -> None:
    labels, probs = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]

    tables = curve_tables(labels, probs, threshold=0.5, calibration_bins=2)

    roc = tables["roc"].to_dict("list")
    assert roc == {
        "fpr": [0.0, 0.0, 0.5, 0.5, 1.0],
        "tpr": [0.0, 0.5, 0.5, 1.0, 1.0],
        "threshold": [1.0, 0.8, 0.4, 0.35, 0.1],  # roc_curve's leading inf reported as 1
    }
    pr = tables["pr"]
    assert pr["recall"].tolist() == [1.0, 1.0, 0.5, 0.5, 0.0]
    assert pr["precision"].tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2, 1.0, 1.0])
    calibration = tables["calibration"]
    assert calibration["bin"].tolist() == [0, 1]
    assert calibration["count"].tolist() == [3, 1]
    assert calibration["mean_predicted"].tolist() == pytest.approx([0.85 / 3, 0.8])
    assert calibration["fraction_positive"].tolist() == pytest.approx([1 / 3, 1.0])
    assert tables["confusion"].values.tolist() == [
        ["NORMAL", "NORMAL"],
        ["NORMAL", "NORMAL"],
        ["PNEUMONIA", "NORMAL"],
        ["PNEUMONIA", "PNEUMONIA"],
    ]


def test_curve_tables_agree_with_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = data
    tables = curve_tables(labels, probs, 0.5, BINS)

    calibration, confusion = tables["calibration"], tables["confusion"]
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


# --- figures -------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["cxr.evaluation", "cxr.explain"])
def test_metric_modules_import_no_plotting(module: str) -> None:
    """Figures live in cxr.figures, so the numbers can be computed without matplotlib."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert {name.split(".")[0] for name in imported}.isdisjoint({"matplotlib"})


def test_save_figures_writes_four_pngs(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    folder = tmp_path / "figures" / "nested"  # does not exist yet

    labels, probs = data
    tables = curve_tables(labels, probs, 0.5, BINS)
    metrics = classification_metrics(labels, probs, 0.5, BINS)
    paths = save_figures(folder, "test", tables, metrics, probs, 0.5, BINS)

    names = ["test_roc.png", "test_pr.png", "test_confusion.png", "test_calibration.png"]
    assert sorted(p.name for p in paths) == sorted(names)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary leftovers
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert min(image.size) > 100


def test_calibration_figure_draws_the_curve_before_calibration(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    labels, probs = data
    sharper = probability_from_logit(2 * np.log(probs / (1 - probs)), 1.0)  # overconfident
    tables = curve_tables(labels, probs, 0.5, BINS)
    before = curve_tables(labels, sharper, 0.5, BINS)["calibration"]
    metrics = classification_metrics(labels, probs, 0.5, BINS) | {
        "ece_uncalibrated": expected_calibration_error(labels, sharper, BINS)
    }
    save_figures(tmp_path, "test", tables, metrics, probs, 0.5, BINS, uncalibrated=before)
    save_figures(tmp_path / "plain", "test", tables, metrics, probs, 0.5, BINS)
    name = "test_calibration.png"
    with Image.open(tmp_path / name) as drawn, Image.open(tmp_path / "plain" / name) as alone:
        assert drawn.format == "PNG"
        assert np.asarray(drawn.convert("L")).tolist() != np.asarray(alone.convert("L")).tolist()


def test_save_history_figure_writes_one_png(tmp_path: Path) -> None:
    history = pd.DataFrame(
        {"epoch": [1, 2, 3], "train_loss": [0.9, 0.5, 0.4], "val_loss": [0.8, 0.6, 0.55],
         "val_auc": [0.7, 0.85, 0.9]}
    )  # fmt: skip
    path = tmp_path / "plots" / "history.png"

    save_history_figure(path, history)

    assert [p.name for p in path.parent.iterdir()] == ["history.png"]
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (1000, 400))  # 10 x 4 inches at 100 dpi


def test_the_notebook_protocol_threshold_has_the_best_accuracy_of_any_threshold():
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        probs = rng.choice(np.linspace(0, 1, 9), n)  # ties
        picked = accuracy_picked_threshold(labels, probs)
        best = max(accuracy_score(labels, probs >= t) for t in [*np.unique(probs), 1.1])
        assert accuracy_score(labels, probs >= picked) == pytest.approx(best)
    # A negative above every positive: the best threshold keeps all positives and that error.
    labels, probs = np.array([0, 1, 1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.2, 0.6])
    assert accuracy_picked_threshold(labels, probs) == pytest.approx(0.6)


def _member(seed: int, order: slice = slice(None)) -> dict[str, pd.DataFrame]:
    """The two files tools/ensemble.py reads from an experiment, for 40 val and 40 test images."""
    rng = np.random.default_rng(seed)
    split = np.repeat(["val", "test"], 40)
    label = np.tile(["NORMAL", "PNEUMONIA"], 40)
    path = [f"{s}/{c}/img{i}.jpeg" for i, (s, c) in enumerate(zip(split, label, strict=True))]
    positive = label == "PNEUMONIA"
    probability = np.clip(0.5 + 0.3 * (positive - 0.5) + rng.normal(0, 0.2, 80), 0.01, 0.99)
    predictions = pd.DataFrame({"path": path, "split": split, "label": label,
                                "probability": probability})  # fmt: skip
    index = pd.DataFrame({"path": path, "patient_id": [f"p{i // 2}" for i in range(80)]})
    return {"data/predictions.csv": predictions[order], "data/processed/index.csv": index}


def test_the_ensemble_tool_averages_members_scoring_the_same_images(monkeypatch):
    import tools.ensemble as ensemble
    from cxr.params import load_params
    from stages.evaluate import Params

    members = {"a": _member(0), "b": _member(1), "shuffled": _member(2, slice(None, None, -1))}
    monkeypatch.setattr(ensemble, "read_csv", lambda path, rev: members[rev][path].copy())
    table, probs = ensemble.member_probabilities(["a", "b"])
    assert list(probs) == ["a", "b"] and len(table) == 80
    params = load_params(Params, Path(__file__).parents[1] / "params.yaml")
    mean = (probs["a"] + probs["b"]) / 2
    row = ensemble.row("ensemble", table, mean, params)
    labels = (table["label"] == "PNEUMONIA").to_numpy()
    test = (table["split"] == "test").to_numpy()
    assert row["test roc_auc"] == pytest.approx(roc_auc_score(labels[test], mean[test]), abs=1e-5)
    assert row["nb accuracy"] >= row["test accuracy"]
    with pytest.raises(SystemExit, match="shuffled scored other images than a"):
        ensemble.member_probabilities(["a", "shuffled"])
