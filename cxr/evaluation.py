"""Metrics, confidence intervals and plot tables for the `evaluate` stage.

Numbers only: the figures drawn from them live in `cxr.figures`, so this module needs no
plotting library.

Labels are 0 = NORMAL, 1 = PNEUMONIA; probabilities are P(PNEUMONIA); an image is predicted
positive when its probability is >= the threshold, the same rule as sklearn's `roc_curve`.
The temperature and the threshold are chosen on validation data only, and then applied
unchanged to the test set.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from pydantic import Field
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.classes import CLASSES
from cxr.params import Count, Section


class EvaluateParams(Section):
    flip_tta: bool
    calibration: Literal["temperature", "none"]
    threshold: Literal["fixed", "youden", "youden_middle", "sensitivity"]
    youden_tolerance: Annotated[float, Field(ge=0, le=0.5)]
    fixed_threshold: Annotated[float, Field(ge=0, le=1)]
    target_sensitivity: Annotated[float, Field(gt=0, le=1)]
    bootstrap: Count
    calibration_bins: Annotated[int, Field(ge=2)]


DIGITS = 5
# The range searched for a temperature. A validation set the network separates perfectly has
# its optimum at T -> 0 (ever sharper), a useless one at T -> inf; the bounds keep both finite
# and the fit reports a bound it stopped at instead of an overflow.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(labels: ArrayLike, logits: ArrayLike) -> float:
    """The temperature T > 0 that minimizes the log loss of sigmoid(logit / T) on `labels`.

    Temperature scaling (Guo et al., 2017) is the calibration with one parameter: it divides
    every logit by the same T, so it cannot change the ranking (AUC) or which images fall on
    either side of a threshold moved with it, only how far the probabilities are from 0.5.
    Fitted on VALIDATION logits it corrects the over- or under-confidence the network learned,
    not a shift between validation and test populations: one number cannot move each region
    of the reliability curve by a different amount.

    The search runs over log T, where the loss is smooth and the bounds are symmetric.
    """
    labels = np.asarray(labels, dtype=int).ravel()
    logits = np.asarray(logits, dtype=float).ravel()
    if labels.size != logits.size:
        raise ValueError(f"{labels.size} labels for {logits.size} logits")
    if np.unique(labels).size < 2:
        raise ValueError("fitting a temperature needs both classes in the labels")
    if not np.isfinite(logits).all():
        raise ValueError("fitting a temperature needs finite logits")
    sign = 2.0 * labels - 1.0  # log loss of one image: log(1 + exp(-sign * logit / T))

    def loss(log_temperature: float) -> float:
        return float(np.logaddexp(0.0, -sign * logits / math.exp(log_temperature)).mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def choose_threshold(
    labels: ArrayLike,
    probs: ArrayLike,
    strategy: str,
    fixed: float,
    target_sensitivity: float,
    tolerance: float = 0.0,
) -> float:
    """Pick the operating point from VALIDATION data, so test metrics stay an unbiased estimate.

    `youden` takes the threshold with the largest sensitivity + specificity - 1 (J). On a nearly
    separable validation set J is flat over a wide range of thresholds, and its argmax is the
    plateau's low edge, the riskiest place to stand when the test population shifts.
    `youden_middle` takes the middle, in logit space, of the unbroken run of thresholds around a
    best one whose J is within `tolerance` of the best. `sensitivity` takes the highest
    threshold reaching the target.
    """
    if strategy == "fixed":
        return float(fixed)
    if strategy not in ("youden", "youden_middle", "sensitivity"):
        raise ValueError(f"unknown threshold strategy {strategy!r}")
    labels, probs = _arrays(labels, probs)
    if np.unique(labels).size < 2:
        raise ValueError(f"threshold strategy {strategy!r} needs both classes in the labels")
    # Every distinct score is a candidate: dropped "intermediate" points could hold the optimum.
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    # roc_curve's first threshold is inf (nothing positive); just above the top score says the
    # same and stays a probability-like number.
    thresholds[0] = np.nextafter(thresholds[1], np.inf)
    j = tpr - fpr
    if strategy == "youden_middle":
        return _middle_of_plateau(thresholds, j, tolerance)
    # Thresholds fall along the curve, so argmax's first hit is the highest qualifying threshold.
    best = np.argmax(j if strategy == "youden" else tpr >= target_sensitivity)
    return float(thresholds[best])


def accuracy_picked_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
    """The threshold of highest accuracy on these labels: the older projects' operating point,
    picked on the test set they then report (their validation folder holds 16 images).

    For the labelled comparison row alone (`test_notebook_protocol`), so a reader sees how much
    of a gap to their figures is protocol; no choice here ever calls it.
    """
    labels, probs = _arrays(labels, probs)
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    thresholds[0] = np.nextafter(thresholds[1], np.inf)
    positives = labels.sum()
    correct = tpr * positives + (1 - fpr) * (labels.size - positives)
    return float(thresholds[np.argmax(correct)])


def _middle_of_plateau(thresholds: np.ndarray, j: np.ndarray, tolerance: float) -> float:
    """The logit-space middle of the widest unbroken run of thresholds whose J is within
    `tolerance` of the best and that holds a best one.

    Only an unbroken run guarantees that every threshold between its ends is near-optimal:
    a dip between two near-optimal islands is not. `thresholds` decrease, and any t with
    thresholds[k] >= t > thresholds[k + 1] classifies like thresholds[k], so a middle clamped
    to the run's ends (the logit round trip can move it by an ulp) has a J of the run.
    """
    best = j >= j.max() - 1e-12  # J values equal in exact arithmetic may differ by an ulp
    near = j >= j.max() - tolerance - 1e-12
    edges = np.flatnonzero(np.diff(np.concatenate([[False], near, [False]]).astype(int)))
    runs = [(start, stop - 1) for start, stop in zip(edges[::2], edges[1::2], strict=True)]
    runs = [(hi, lo) for hi, lo in runs if best[hi : lo + 1].any()]
    high, low = max(runs, key=lambda run: _logit(thresholds[run[0]]) - _logit(thresholds[run[1]]))
    middle = 1 / (1 + math.exp(-(_logit(thresholds[high]) + _logit(thresholds[low])) / 2))
    return float(min(max(middle, thresholds[low]), thresholds[high]))


def _logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def classification_metrics(
    labels: ArrayLike, probs: ArrayLike, threshold: float, calibration_bins: int
) -> dict[str, float | int | None]:
    """Everything metrics.json reports; undefined values are None, since JSON has no NaN.

    Beside the operating point and AUC it reports the proper scores (log loss, Brier), which
    see the probabilities themselves, and the specificity at 95% sensitivity, which a screening
    model is judged by: two models with the same AUC can differ in all three, so they rank
    models on validation where AUC alone ties.
    """
    labels, probs = _arrays(labels, probs)
    preds = _predict(probs, threshold)
    tn, fp, fn, tp = _confusion(labels, preds)
    both_classes = np.unique(labels).size == 2
    recall = recall_score(labels, preds, zero_division=np.nan)
    values = {
        "accuracy": accuracy_score(labels, preds),
        "precision": precision_score(labels, preds, zero_division=np.nan),
        "recall": recall,
        "sensitivity": recall,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "f1": f1_score(labels, preds, zero_division=np.nan),
        "roc_auc": roc_auc_score(labels, probs) if both_classes else None,
        "pr_auc": average_precision_score(labels, probs) if both_classes else None,
        "specificity_at_95_sensitivity": (
            specificity_at_sensitivity(labels, probs, 0.95) if both_classes else None
        ),
    }
    return {name: _json_float(value) for name, value in values.items()} | probability_scores(
        labels, probs, calibration_bins
    ) | {
        "tn": tn, "fp": fp, "fn": fn, "tp": tp, "n": int(labels.size),
        "prevalence": _json_float(labels.mean()),
    }  # fmt: skip


def probability_scores(labels: ArrayLike, probs: ArrayLike, calibration_bins: int) -> dict:
    """The scores that read the probabilities themselves, not only their order or a threshold:
    Brier, log loss and ECE. The evaluate stage reports them before and after calibration."""
    labels, probs = _arrays(labels, probs)
    values = {
        "brier": brier_score_loss(labels, probs, pos_label=1),
        "log_loss": log_loss(labels, probs, labels=[0, 1]),
        "ece": expected_calibration_error(labels, probs, calibration_bins),
    }
    return {name: _json_float(value) for name, value in values.items()}


def split_metrics(
    labels: np.ndarray,
    patients: pd.Series,
    probs: np.ndarray,
    uncalibrated: np.ndarray,
    threshold: float,
    settings: EvaluateParams,
    seed: int,
) -> dict:
    """Point metrics of the calibrated probabilities, the probability scores before
    calibration (`ece_uncalibrated`), and flat 95% bootstrap bounds (`roc_auc_ci_low`), easy to
    read in a diff."""
    if labels.size == 0:  # the guard refused every image
        return {"n": 0}
    metrics = classification_metrics(labels, probs, threshold, settings.calibration_bins)
    before = probability_scores(labels, uncalibrated, settings.calibration_bins)
    metrics |= {f"{name}_uncalibrated": value for name, value in before.items()}
    metrics["patients"] = int(patients.nunique())
    intervals = bootstrap_intervals(labels, probs, patients, threshold, settings.bootstrap, seed)
    for name, (low, high) in intervals.items():
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    return metrics


def notebook_protocol(labels: np.ndarray, probs: np.ndarray, bins: int) -> dict:
    """Test accuracy, sensitivity and specificity at the threshold picked on test itself."""
    threshold = accuracy_picked_threshold(labels, probs)
    metrics = classification_metrics(labels, probs, threshold, bins)
    kept = ("accuracy", "sensitivity", "specificity", "f1")
    return {"threshold_picked_on_test": round(threshold, 6)} | {k: metrics[k] for k in kept}


def specificity_at_sensitivity(labels: ArrayLike, probs: ArrayLike, target: float) -> float:
    """The specificity at the highest threshold whose sensitivity reaches `target`: how many
    healthy children a screen that misses at most 1 - target of pneumonias would send home.

    Every distinct score is a candidate threshold (`drop_intermediate=False`): a dropped point
    on a straight stretch of the curve can be the first to reach the target, and the kept point
    after it has a lower specificity. Thresholds fall along the curve and false positives only
    grow, so the first qualifying point is also the best one.
    """
    labels, probs = _arrays(labels, probs)
    fpr, tpr, _ = roc_curve(labels, probs, drop_intermediate=False)
    return float(1 - fpr[np.argmax(tpr >= target)])


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int) -> float:
    """How far predicted probabilities are from observed frequencies, weighted by bin size."""
    labels, probs = _arrays(labels, probs)
    table = calibration_table(labels, probs, bins)
    gaps = (table["fraction_positive"] - table["mean_predicted"]).abs()
    return float((gaps * table["count"]).sum() / labels.size)


def bootstrap_intervals(
    labels: ArrayLike,
    probs: ArrayLike,
    groups: Iterable[Hashable],
    threshold: float,
    resamples: int,
    seed: int,
) -> dict[str, list[float | None]]:
    """95% percentile intervals, so a reader can tell a real difference from sampling noise.

    A cluster bootstrap over patients: `groups` names each image's patient (any hashable), and
    each resample draws as many patients as there are, with replacement, keeping all images of
    each drawn patient. Images of one patient are not independent (same lungs, same disease,
    often the same visit), so resampling images would treat a patient's second film as new
    evidence and give intervals that are too narrow; the patient is the unit that was sampled.

    Patients are numbered in order of first appearance, so the draws for a seed do not depend on
    how the ids are spelled. A drawn patient's images enter a resample with the number of times
    the patient was drawn as their weight, which keeps all resamples in one array although they
    hold different numbers of images.
    """
    labels, probs = _arrays(labels, probs)
    patients, _ = pd.factorize(pd.Series(list(groups), dtype=object))
    if patients.size != labels.size:
        raise ValueError(f"{patients.size} patient ids for {labels.size} images")
    if (patients < 0).any():  # factorize codes a missing id as -1
        raise ValueError("every image needs a patient id; some are missing")
    if resamples == 0:
        return {}
    count = int(patients.max()) + 1
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, count, size=(resamples, count))  # one resample per row
    # How often each patient was drawn in each resample, via one bincount over offset ids.
    offsets = drawn + count * np.arange(resamples)[:, None]
    times_drawn = np.bincount(offsets.ravel(), minlength=resamples * count)
    weights = times_drawn.reshape(resamples, count)[:, patients].astype(float)  # (resamples, N)

    positive, preds = labels == 1, _predict(probs, threshold)
    positives = weights @ positive
    negatives = weights @ ~positive
    samples = {
        "roc_auc": _ratio(_weighted_mann_whitney(weights, positive, probs), positives * negatives),
        "sensitivity": _ratio(weights @ (preds & positive), positives),
        "specificity": _ratio(weights @ (~preds & ~positive), negatives),
        "accuracy": (weights @ (preds == positive)) / weights.sum(axis=1),
    }
    return {name: _percentile_interval(values) for name, values in samples.items()}


def _weighted_mann_whitney(
    weights: np.ndarray, positive: np.ndarray, probs: np.ndarray
) -> np.ndarray:
    """Per resample, the weighted count of (positive, negative) pairs the scores rank correctly.

    Divided by (positive weight x negative weight) it is the ROC AUC: the Mann-Whitney U of the
    resample with each image repeated `weight` times, tied scores counting half, as sklearn
    does. Scores are the same in every resample, so images are sorted and grouped into distinct
    scores once and only the weights change; roc_auc_score in a loop would take seconds.
    """
    order = np.argsort(probs, kind="stable")
    scores, positive, weights = probs[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.diff(scores, prepend=-np.inf))  # first image of each score
    positive_mass = np.add.reduceat(weights * positive, starts, axis=1)
    negative_mass = np.add.reduceat(weights * ~positive, starts, axis=1)
    negative_below = np.cumsum(negative_mass, axis=1) - negative_mass
    return (positive_mass * (negative_below + negative_mass / 2)).sum(axis=1)


def curve_tables(
    labels: ArrayLike, probs: ArrayLike, threshold: float, calibration_bins: int
) -> dict[str, pd.DataFrame]:
    """Data for DVC plots, which draw from tables rather than from images."""
    labels, probs = _arrays(labels, probs)
    fpr, tpr, roc_thresholds = roc_curve(labels, probs)
    precision, recall, _ = precision_recall_curve(labels, probs)
    names = np.array(CLASSES)
    return {
        "roc": pd.DataFrame(
            {"fpr": fpr, "tpr": tpr, "threshold": np.clip(roc_thresholds, 0.0, 1.0)}
        ),
        "pr": pd.DataFrame({"recall": recall, "precision": precision}),
        "calibration": calibration_table(labels, probs, calibration_bins),
        # DVC's confusion template counts rows, so one row per image.
        "confusion": pd.DataFrame(
            {"actual": names[labels], "predicted": names[_predict(probs, threshold).astype(int)]}
        ),
    }


def calibration_table(labels: np.ndarray, probs: np.ndarray, bins: int) -> pd.DataFrame:
    """Filled uniform bins with their image counts, which ECE and the reliability plot need."""
    fraction, mean = calibration_curve(labels, probs, n_bins=bins, strategy="uniform", pos_label=1)
    # calibration_curve drops empty bins and returns no counts; bin the same way it does.
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], probs), minlength=bins)
    filled = np.flatnonzero(counts)
    return pd.DataFrame(
        {"bin": filled, "mean_predicted": mean, "fraction_positive": fraction,
         "count": counts[filled]}
    )  # fmt: skip


def _arrays(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(labels, dtype=int).ravel(), np.asarray(probs, dtype=float).ravel()


def _predict(probs: np.ndarray, threshold: float) -> np.ndarray:
    return probs >= threshold


def _confusion(labels: np.ndarray, preds: np.ndarray) -> tuple[int, int, int, int]:
    tn, fp, fn, tp = confusion_matrix(labels, preds, labels=[0, 1]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division, NaN where the denominator is 0 (an undefined rate)."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.full(numerator.shape, np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def _percentile_interval(values: np.ndarray) -> list[float | None]:
    defined = values[np.isfinite(values)]  # resamples where the metric is undefined are skipped
    if defined.size == 0:
        return [None, None]
    return [_json_float(v) for v in np.percentile(defined, [2.5, 97.5])]


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), DIGITS)
