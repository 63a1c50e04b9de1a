"""The evaluate stage's figures: ROC and precision-recall curves, confusion matrix and
reliability diagram, for people to look at beside the numbers in metrics/evaluate.json.

The numbers come from `cxr.evaluation`, which draws nothing, so the metrics are tested and
computed without any figure machinery. Figures are plain `Figure` objects (see cxr/figures.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import ConfusionMatrixDisplay

from cxr.atomic import write_png
from cxr.classes import CLASSES


def save_figures(
    folder: Path,
    split: str,
    tables: dict[str, pd.DataFrame],
    metrics: dict,
    probs: ArrayLike,
    threshold: float,
    calibration_bins: int,
    uncalibrated: pd.DataFrame | None = None,
) -> list[Path]:
    """Static PNGs for reports and MLflow, where DVC's interactive plots are not available.

    They draw the tables (`evaluation.curve_tables`) and metrics
    (`evaluation.classification_metrics`) the stage writes for DVC, so a figure cannot disagree
    with metrics.json. `uncalibrated` is the reliability table before temperature scaling,
    drawn beside the calibrated one with `metrics["ece_uncalibrated"]`, so the figure shows
    what calibration changed.
    """
    figures = {
        "roc": _roc_figure(split, tables["roc"], metrics, threshold),
        "pr": _pr_figure(split, tables["pr"], metrics),
        "confusion": _confusion_figure(split, metrics, threshold),
        "calibration": _calibration_figure(
            split,
            tables["calibration"],
            metrics["ece"],
            probs,
            calibration_bins,
            uncalibrated,
            metrics.get("ece_uncalibrated"),
        ),
    }
    paths = []
    for name, figure in figures.items():
        path = Path(folder) / f"{split}_{name}.png"
        write_png(path, figure, dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def _roc_figure(split: str, roc: pd.DataFrame, metrics: dict, threshold: float) -> Figure:
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.plot(roc["fpr"], roc["tpr"], label=f"ROC (AUC = {metrics['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    operating_point = (1 - metrics["specificity"], metrics["sensitivity"])
    ax.plot(*operating_point, "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=f"ROC - {split}")
    ax.legend(loc="lower right")
    return figure


def _pr_figure(split: str, pr: pd.DataFrame, metrics: dict) -> Figure:
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.plot(pr["recall"], pr["precision"], label=f"PR (AP = {metrics['pr_auc']:.3f})")
    ax.axhline(metrics["prevalence"], color="k", ls="--", lw=1, label="prevalence (chance)")
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall - {split}")
    ax.legend(loc="lower left")
    return figure


def _confusion_figure(split: str, metrics: dict, threshold: float) -> Figure:
    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    # Share of each actual class; a class with no images shows 0 % rather than a division error.
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(5, 4.5))
    ax = figure.subplots()
    display = ConfusionMatrixDisplay(matrix, display_labels=list(CLASSES))
    display.plot(ax=ax, cmap="Blues", colorbar=False)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(f"{matrix[i, j]}\n({100 * row_share[i, j]:.1f}%)")
    ax.set_title(f"Confusion - {split} (threshold {threshold:.3f})")
    return figure


def _calibration_figure(
    split: str,
    table: pd.DataFrame,
    ece: float,
    probs: ArrayLike,
    bins: int,
    uncalibrated: pd.DataFrame | None = None,
    ece_uncalibrated: float | None = None,
) -> Figure:
    """The reliability diagram of the deployed (calibrated) probabilities, over the one before
    calibration when given, and the histogram of the deployed probabilities."""
    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    title = f"Calibration - {split} (ECE = {ece:.3f})"
    if uncalibrated is not None:
        before = "" if ece_uncalibrated is None else f" (ECE {ece_uncalibrated:.3f})"
        top.plot(
            uncalibrated["mean_predicted"], uncalibrated["fraction_positive"], "s:",
            color="C7", label=f"before calibration{before}",
        )  # fmt: skip
        if ece_uncalibrated is not None:
            title = f"Calibration - {split} (ECE {ece_uncalibrated:.3f} -> {ece:.3f})"
    top.plot(table["mean_predicted"], table["fraction_positive"], "o-", label="deployed model")
    top.set(ylabel="fraction PNEUMONIA", ylim=(-0.02, 1.02))
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.hist(np.ravel(probs), bins=bins, range=(0, 1), color="C0", edgecolor="white")
    bottom.set(xlabel="predicted P(PNEUMONIA)", ylabel="images", xlim=(0, 1))
    return figure
