"""Every matplotlib figure the pipeline writes: training history, evaluation, input guard
and Grad-CAM.

The numbers come from `cxr.evaluation` and `cxr.explain`, which hold no plotting code, so the
metrics can be tested, and imported by stages that draw nothing, without any figure machinery.
This module imports neither, so the train stage, which draws its history here, does not depend
on them.

Figures are built as plain `Figure` objects, never registered with pyplot: there is no global
figure to close, a long run cannot accumulate them, and no display backend is needed, since
`savefig` renders a PNG with matplotlib's Agg renderer whatever backend is configured.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import ArrayLike
from pytorch_grad_cam.utils.image import show_cam_on_image
from sklearn.metrics import ConfusionMatrixDisplay

from cxr.atomic import atomic_path
from cxr.dataset import CLASSES

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, as in cxr.explain

# Grad-CAM panels are drawn at ~256 px per image, so even 64 px inputs are readable.
PANEL_PX = 256
DPI = 100


def save_history_figure(path: Path, history: pd.DataFrame) -> None:
    """Loss and validation AUC per epoch, to see at a glance whether training converged."""
    figure = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_auc = figure.subplots(1, 2)
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_auc.plot(history["epoch"], history["val_auc"], marker="o", color="tab:green")
    ax_auc.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation ROC-AUC")
    _save(figure, path, dpi=DPI)


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
        _save(figure, path, dpi=120, bbox_inches="tight")
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


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 (H, W) X-ray under a jet heatmap of the map, as uint8 (H, W, 3) RGB."""
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    return show_cam_on_image(rgb, cam, use_rgb=True)


def save_panel(
    path: Path, image: np.ndarray, cam: np.ndarray, title: str, box: Box | None = None
) -> None:
    """X-ray and overlay side by side at ~256 px each, so even 64 px inputs are readable."""
    side = PANEL_PX / DPI
    figure = Figure(figsize=(2 * side, side + 0.45), layout="constrained")
    left, right = figure.subplots(1, 2)
    _show(left, image, box=box)
    _show(right, overlay(image, cam), box=box)
    figure.suptitle(title, fontsize=10)
    _save(figure, path, dpi=DPI)


def save_montage(
    path: Path,
    images: list[np.ndarray],
    cams: list[np.ndarray],
    titles: list[str],
    columns: int = 4,
) -> None:
    """All overlays in one grid, to compare many cases at a glance."""
    if not images or not len(images) == len(cams) == len(titles):
        raise ValueError("montage needs equally many images, maps and titles, at least one")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    side = PANEL_PX / DPI
    figure = Figure(figsize=(columns * side, rows * (side + 0.3)), layout="constrained")
    grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axes, image, cam, title in zip(grid, images, cams, titles, strict=False):
        _show(axes, overlay(image, cam), title)
    for axes in grid[len(images) :]:
        axes.set_axis_off()
    _save(figure, path, dpi=DPI)


def save_guard_figures(
    folder: Path,
    scores: pd.DataFrame,
    threshold: float,
    examples: list[tuple[str, np.ndarray, float]],
) -> None:
    """The guard's scores per kind of image against its threshold, and one image of each kind
    as the network sees it, with its score and verdict."""
    kinds = list(dict.fromkeys(scores["kind"]))
    figure = Figure(figsize=(8, 0.45 * len(kinds) + 1.2), layout="constrained")
    axes = figure.subplots()
    for row, kind in enumerate(kinds):
        values = scores.loc[scores["kind"] == kind, "score"].to_numpy()
        jitter = np.random.default_rng(row).uniform(-0.25, 0.25, len(values))
        axes.scatter(np.maximum(values, 1e-3), row + jitter, s=6, alpha=0.5)
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    axes.set(xscale="log", yticks=range(len(kinds)), yticklabels=kinds, xlabel="guard score")
    axes.invert_yaxis()
    axes.legend(loc="lower right", fontsize=8)
    _save(figure, folder / "scores.png", dpi=DPI)

    side = PANEL_PX / DPI * 0.75
    figure = Figure(figsize=(len(examples) * side, side + 0.5), layout="constrained")
    for axes, (kind, image, score) in zip(
        np.atleast_1d(figure.subplots(1, len(examples))), examples, strict=True
    ):
        verdict = "flagged" if score > threshold else "passed"
        _show(axes, image, f"{kind}\n{score:.3g}: {verdict}")
    _save(figure, folder / "examples.png", dpi=DPI)


def _show(axes: Axes, picture: np.ndarray, title: str = "", box: Box | None = None) -> None:
    axes.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=9)
    if box is not None:
        x0, y0, x1, y1 = box
        # Pixel centres sit on integers, so a box's outer edge is half a pixel out.
        outline = Rectangle(
            (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5
        )
        axes.add_patch(outline)


def _save(figure: Figure, path: Path, dpi: int, bbox_inches: str | None = None) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox_inches)
