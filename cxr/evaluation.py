"""Metrics, confidence intervals, plot tables and figures for the `evaluate` stage.

Labels are 0 = NORMAL, 1 = PNEUMONIA; probabilities are P(PNEUMONIA); an image is predicted
positive when its probability is >= the threshold, the same rule as sklearn's `roc_curve`.
The threshold is chosen on validation data only, and then applied unchanged to the test set.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.atomic import atomic_path
from cxr.dataset import CLASSES

matplotlib.use("Agg")  # stages run headless; figures are only ever written to files

DIGITS = 5


def choose_threshold(
    labels: ArrayLike, probs: ArrayLike, strategy: str, fixed: float, target_sensitivity: float
) -> float:
    """Pick the operating point from VALIDATION data, so test metrics stay an unbiased estimate."""
    if strategy == "fixed":
        return float(fixed)
    if strategy not in ("youden", "sensitivity"):
        raise ValueError(f"unknown threshold strategy {strategy!r}")
    labels, probs = _arrays(labels, probs)
    if np.unique(labels).size < 2:
        raise ValueError(f"threshold strategy {strategy!r} needs both classes in the labels")
    # Every distinct score is a candidate: dropped "intermediate" points could hold the optimum.
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    # Thresholds fall along the curve, so argmax's first hit is the highest qualifying threshold.
    best = np.argmax(tpr - fpr if strategy == "youden" else tpr >= target_sensitivity)
    return float(np.clip(thresholds[best], 0.0, 1.0))  # the first threshold is inf


def classification_metrics(
    labels: ArrayLike, probs: ArrayLike, threshold: float, calibration_bins: int
) -> dict[str, float | int | None]:
    """Everything metrics.json reports; undefined values are None, since JSON has no NaN."""
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
        "brier": brier_score_loss(labels, probs, pos_label=1),
        "ece": expected_calibration_error(labels, probs, calibration_bins),
    }
    return {name: _json_float(value) for name, value in values.items()} | {
        "tn": tn, "fp": fp, "fn": fn, "tp": tp, "n": int(labels.size),
        "prevalence": _json_float(labels.mean()),
    }  # fmt: skip


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int) -> float:
    """How far predicted probabilities are from observed frequencies, weighted by bin size."""
    labels, probs = _arrays(labels, probs)
    table = _calibration_table(labels, probs, bins)
    gaps = (table["fraction_positive"] - table["mean_predicted"]).abs()
    return float((gaps * table["count"]).sum() / labels.size)


def bootstrap_intervals(
    labels: ArrayLike, probs: ArrayLike, threshold: float, resamples: int, seed: int
) -> dict[str, list[float | None]]:
    """95% percentile intervals, so a reader can tell a real difference from sampling noise."""
    if resamples == 0:
        return {}
    labels, probs = _arrays(labels, probs)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, labels.size, size=(resamples, labels.size))  # one resample per row
    y, scores = labels[rows], probs[rows]
    preds = _predict(scores, threshold)
    positives = y.sum(axis=1)
    negatives = labels.size - positives
    # roc_auc_score in a loop takes seconds; the Mann-Whitney form is the same AUC (ties get
    # half credit through mid-ranks), computed for all resamples at once.
    rank_sums = (rankdata(scores, axis=1) * y).sum(axis=1)
    samples = {
        "roc_auc": _ratio(rank_sums - positives * (positives + 1) / 2, positives * negatives),
        "sensitivity": _ratio((preds & (y == 1)).sum(axis=1), positives),
        "specificity": _ratio((~preds & (y == 0)).sum(axis=1), negatives),
        "accuracy": (preds == (y == 1)).mean(axis=1),
    }
    return {name: _percentile_interval(values) for name, values in samples.items()}


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
        "calibration": _calibration_table(labels, probs, calibration_bins),
        # DVC's confusion template counts rows, so one row per image.
        "confusion": pd.DataFrame(
            {"actual": names[labels], "predicted": names[_predict(probs, threshold).astype(int)]}
        ),
    }


def save_figures(
    folder: Path,
    split: str,
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    calibration_bins: int,
) -> list[Path]:
    """Static PNGs for reports and MLflow, where DVC's interactive plots are not available.

    Figures are built as plain `Figure` objects, never registered with pyplot, so there is no
    global figure to close and a long run cannot accumulate them.
    """
    labels, probs = _arrays(labels, probs)
    figures = {
        "roc": _roc_figure(split, labels, probs, threshold),
        "pr": _pr_figure(split, labels, probs),
        "confusion": _confusion_figure(split, labels, probs, threshold),
        "calibration": _calibration_figure(split, labels, probs, calibration_bins),
    }
    paths = []
    for name, figure in figures.items():
        path = Path(folder) / f"{split}_{name}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def _roc_figure(split: str, labels: np.ndarray, probs: np.ndarray, threshold: float) -> Figure:
    fpr, tpr, _ = roc_curve(labels, probs)
    tn, fp, fn, tp = _confusion(labels, _predict(probs, threshold))
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.plot(fpr, tpr, label=f"ROC (AUC = {roc_auc_score(labels, probs):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.plot(fp / (fp + tn), tp / (tp + fn), "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=f"ROC - {split}")
    ax.legend(loc="lower right")
    return figure


def _pr_figure(split: str, labels: np.ndarray, probs: np.ndarray) -> Figure:
    precision, recall, _ = precision_recall_curve(labels, probs)
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.plot(recall, precision, label=f"PR (AP = {average_precision_score(labels, probs):.3f})")
    ax.axhline(labels.mean(), color="k", ls="--", lw=1, label="prevalence (chance)")
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall - {split}")
    ax.legend(loc="lower left")
    return figure


def _confusion_figure(
    split: str, labels: np.ndarray, probs: np.ndarray, threshold: float
) -> Figure:
    matrix = confusion_matrix(labels, _predict(probs, threshold), labels=[0, 1])
    row_share = _ratio(matrix, matrix.sum(axis=1, keepdims=True))
    figure = Figure(figsize=(5, 4.5))
    ax = figure.subplots()
    display = ConfusionMatrixDisplay(matrix, display_labels=list(CLASSES))
    display.plot(ax=ax, cmap="Blues", colorbar=False)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(f"{matrix[i, j]}\n({100 * row_share[i, j]:.1f}%)")
    ax.set_title(f"Confusion - {split} (threshold {threshold:.3f})")
    return figure


def _calibration_figure(split: str, labels: np.ndarray, probs: np.ndarray, bins: int) -> Figure:
    table = _calibration_table(labels, probs, bins)
    ece = expected_calibration_error(labels, probs, bins)
    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    top.plot(table["mean_predicted"], table["fraction_positive"], "o-", label="model")
    top.set(ylabel="fraction PNEUMONIA", ylim=(-0.02, 1.02))
    top.set_title(f"Calibration - {split} (ECE = {ece:.3f})")
    top.legend(loc="upper left")
    bottom.hist(probs, bins=bins, range=(0, 1), color="C0", edgecolor="white")
    bottom.set(xlabel="predicted P(PNEUMONIA)", ylabel="images", xlim=(0, 1))
    return figure


def _calibration_table(labels: np.ndarray, probs: np.ndarray, bins: int) -> pd.DataFrame:
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
