"""Pictures of X-rays: an image with its Grad-CAM heatmap, panels and montages of them, and the
drawing every X-ray figure shares (the input guard's examples, the page's overlay).

Each stage's charts (training history, ROC and calibration, the guard's scores) live beside
the code that makes them, so a change here re-runs only the stages that draw X-rays.

Figures are built as plain `Figure` objects, never registered with pyplot: there is no global
figure to close, a long run cannot accumulate them, and no display backend is needed, since
`savefig` renders a PNG with matplotlib's Agg renderer whatever backend is configured.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pytorch_grad_cam.utils.image import show_cam_on_image

from cxr.atomic import write_png

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, as in cxr.explain

# Grad-CAM panels are drawn at ~256 px per image, so even 64 px inputs are readable.
PANEL_PX = 256
DPI = 100


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
    show_xray(left, image, box=box)
    show_xray(right, overlay(image, cam), box=box)
    figure.suptitle(title, fontsize=10)
    write_png(path, figure, DPI)


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
        show_xray(axes, overlay(image, cam), title)
    for axes in grid[len(images) :]:
        axes.set_axis_off()
    write_png(path, figure, DPI)


def show_xray(axes: Axes, picture: np.ndarray, title: str = "", box: Box | None = None) -> None:
    """A uint8 grayscale (or RGB) picture at its pixels, with a lesion box if given."""
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
