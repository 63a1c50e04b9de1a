"""Synthetic chest-X-ray-like data in the Kaggle "chest-xray-pneumonia" layout.

This is the pipeline's default data source, so that every stage runs offline and in minutes on
two CPU cores. The files mimic what the real data throws at the pipeline (patient-coded names,
several images per patient, a tiny val folder, varying sizes, a few RGB JPEGs), and each
PNEUMONIA image carries a known lesion box so that Grad-CAM localisation can be scored.

The task is made hard enough not to saturate, so that `dvc metrics diff` can show a change in
either direction: some lesions are faint, half of the NORMAL images carry a small, faint
unilateral look-alike, and the test split is large enough (about 180 images at the default
250 patients) to rank models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from cxr.classes import CLASSES

MIN_PATIENTS = 8  # two val patients per class plus one train and one test patient per class

_PLAN_STREAM = 0  # RNG stream keys, so the plan and each image draw independent numbers
_IMAGE_STREAM = 1
_NORMAL_SHARE = 0.25  # of patients; with equal images per patient this is 1:3 by images
_TEST_SHARE = 0.3  # of each class's non-val patients: a test set large enough to rank models
_NORMAL2_SHARE = 0.4
_BACTERIA_SHARE = 0.65
_RGB_SHARE = 0.05
_ASPECT = (0.75, 1.35)  # width / height
# Lesions: most are bright, so that a small network trained from scratch picks the task up
# within a few epochs; the faint ones overlap the look-alikes, so the task does not saturate.
_LESION_EXTENT = (0.35, 0.6)  # main blob's diameter at _BOX_LEVEL, as a share of lung width
_LESION_PEAK = (60.0, 100.0)  # grey levels added at the opacity's peak
_FAINT_SHARE = 0.3  # of PNEUMONIA images: a faint lesion instead
_FAINT_PEAK = (15.0, 35.0)
_LOOKALIKE_SHARE = 0.5  # of NORMAL images: a small, faint unilateral brightening, no lesion
_LOOKALIKE_EXTENT = (0.15, 0.35)
_LOOKALIKE_PEAK = (10.0, 35.0)
_BASES_SHARE = 0.4  # of NORMAL images: bilateral brightening of the lung bases
_BOX_LEVEL = 0.2  # the lesion box is where the opacity exceeds this fraction of its peak
_BOX_RADIUS = float(np.sqrt(2 * np.log(1 / _BOX_LEVEL)))  # that level's radius, in sigmas
_LUNG_MARGIN = 0.9  # the lesion box stays inside the lung ellipse shrunk by this factor
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Patient:
    split: str
    label: str
    images: int


@dataclass(frozen=True)
class _ImageSpec:
    path: str  # relative to out_dir, POSIX
    label: str
    rgb: bool


class _Blob(NamedTuple):
    """One gaussian of an opacity, offset from the opacity's centre, in pixels."""

    dx: float
    dy: float
    sigma_x: float
    sigma_y: float
    weight: float


@dataclass(frozen=True)
class _Ellipse:
    """An axis-aligned ellipse in pixels; `taper` narrows its top half, like a lung apex."""

    cx: float
    cy: float
    ax: float
    ay: float
    taper: float = 0.0

    def r2(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Squared normalised radius (<= 1 inside), for scalars or broadcastable grids."""
        from_top = np.clip((y - self.cy) / self.ay + 1, 0, 1)  # 0 at the top, 1 from mid-height
        half_width = self.ax * (1 - self.taper * (1 - from_top))
        return ((x - self.cx) / half_width) ** 2 + ((y - self.cy) / self.ay) ** 2

    def mask(self, xs: np.ndarray, ys: np.ndarray, edge: float) -> np.ndarray:
        """1 inside, 0 outside, with a ramp of relative width `edge` so edges are not jagged."""
        return np.clip((1 - self.r2(xs, ys)) / (2 * edge), 0, 1)


def generate_demo_dataset(
    out_dir: Path, *, patients: int, seed: int, min_side: int, max_side: int
) -> pd.DataFrame:
    """Write {train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg under out_dir and return the lesion table.

    The table has one row per PNEUMONIA image: `path` (relative to out_dir, POSIX) and the
    lesion box `x0, y0, x1, y1` in that file's pixels (x1, y1 exclusive). Image i draws from
    its own RNG seeded with (seed, i), so the output is byte-identical for the same arguments.
    """
    if patients < MIN_PATIENTS:
        raise ValueError(f"patients must be at least {MIN_PATIENTS}, got {patients}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side} and {max_side}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; refusing to write the demo dataset there")

    plan_rng = np.random.default_rng((seed, _PLAN_STREAM))
    specs = _name_images(_plan_patients(patients, plan_rng), plan_rng)
    rows = []
    for index, spec in enumerate(specs):
        rng = np.random.default_rng((seed, _IMAGE_STREAM, index))
        pixels, box = draw_image(rng, spec.label == "PNEUMONIA", min_side, max_side)
        _save_jpeg(pixels, out_dir / spec.path, rgb=spec.rgb)
        if box is not None:
            rows.append((spec.path, *box))
    return pd.DataFrame(rows, columns=["path", "x0", "y0", "x1", "y1"])


def _plan_patients(patients: int, rng: np.random.Generator) -> list[_Patient]:
    """Split by patient, like Kaggle: no patient straddles splits; val patients are their own."""
    n_val = max(2, patients // 40)
    rest = patients - 2 * n_val
    n_normal = max(2, round(rest * _NORMAL_SHARE))
    plan = []
    for label, count in zip(CLASSES, (n_normal, rest - n_normal), strict=True):
        n_test = max(1, round(count * _TEST_SHARE))
        splits = rng.permutation(["test"] * n_test + ["train"] * (count - n_test))
        plan += [_Patient(str(split), label, int(rng.integers(1, 5))) for split in splits]
        plan += [_Patient("val", label, 1)] * n_val
    return plan


def _name_images(plan: list[_Patient], rng: np.random.Generator) -> list[_ImageSpec]:
    """Kaggle file names; patient ids are unique per class, so they can be parsed back."""
    normal = [p for p in plan if p.label == "NORMAL"]
    pneumonia = [p for p in plan if p.label == "PNEUMONIA"]
    named: list[tuple[str, str]] = []

    normal_ids = rng.choice(3 * len(normal) + 50, size=len(normal), replace=False) + 1
    normal2 = rng.random(len(normal)) < _NORMAL2_SHARE
    for patient, pid, second in zip(normal, normal_ids, normal2, strict=True):
        prefix = "NORMAL2-IM" if second else "IM"
        named += [
            (f"{patient.split}/NORMAL/{prefix}-{pid:04d}-{k:04d}.jpeg", "NORMAL")
            for k in range(1, patient.images + 1)
        ]

    person_ids = rng.choice(3 * len(pneumonia) + 50, size=len(pneumonia), replace=False) + 1
    kinds = np.where(rng.random(len(pneumonia)) < _BACTERIA_SHARE, "bacteria", "virus")
    number = 0  # Kaggle numbers PNEUMONIA images across the whole dataset, rising with person id
    for i in np.argsort(person_ids):
        patient = pneumonia[i]
        for _ in range(patient.images):
            number += 1
            path = f"{patient.split}/PNEUMONIA/person{person_ids[i]}_{kinds[i]}_{number}.jpeg"
            named.append((path, "PNEUMONIA"))

    named.sort()  # image i is the i-th path, whatever order the plan produced them in
    rgb = set(rng.choice(len(named), size=max(1, round(len(named) * _RGB_SHARE)), replace=False))
    return [_ImageSpec(path, label, i in rgb) for i, (path, label) in enumerate(named)]


def draw_image(
    rng: np.random.Generator, pneumonia: bool, min_side: int, max_side: int
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """One image of its own size; PNEUMONIA ones get a lesion, NORMAL ones distractors.

    A NORMAL image may get a bilateral brightening of the lung bases and, independently, a
    look-alike: a single gaussian drawn like a lesion but smaller and at most as bright as a
    faint one, so faint lesions and look-alikes are hard to tell apart.
    """
    height = int(rng.integers(min_side, max_side + 1))
    width = int(np.clip(round(height * rng.uniform(*_ASPECT)), min_side, max_side))
    image, lungs, lung_mask = _draw_chest(rng, height, width)
    box = None
    lung = lungs[int(rng.integers(2))]
    if pneumonia:
        peak = _FAINT_PEAK if rng.random() < _FAINT_SHARE else _LESION_PEAK
        box = _add_opacity(rng, image, lung, _LESION_EXTENT, peak, max_extra_blobs=2)
    else:
        if rng.random() < _BASES_SHARE:
            _brighten_lung_bases(rng, image, lungs[0], lung_mask)  # both lungs span the same rows
        if rng.random() < _LOOKALIKE_SHARE:
            _add_opacity(rng, image, lung, _LOOKALIKE_EXTENT, _LOOKALIKE_PEAK, max_extra_blobs=0)
    _add_texture(rng, image)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), box


def _draw_chest(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, tuple[_Ellipse, ...], np.ndarray]:
    """Torso and neck, spine and mediastinum, two dark lung fields with faint ribs and markings.

    The anatomy is symmetric about a slightly shifted midline and slightly scaled per image, so
    a lesion shows as a left-right difference. Returns the image, the lungs and their mask.
    """
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    scale = rng.uniform(0.92, 1.06)
    sx, sy = width * scale, height * scale
    cx = width * (0.5 + rng.uniform(-0.012, 0.012))
    cy = height * (0.5 + rng.uniform(-0.04, 0.04))

    torso = _Ellipse(cx, cy + 0.22 * sy, 0.47 * sx, 0.78 * sy).mask(xs, ys, 0.04)
    neck = np.exp(-(((xs - cx) / (0.11 * sx)) ** 4))
    image = rng.uniform(8, 25) + rng.uniform(95, 125) * np.maximum(torso, neck)
    spine_width = 0.035 * sx + 0.045 * sx * np.clip((ys - cy) / (0.3 * sy), 0, 1)
    image += rng.uniform(30, 50) * np.exp(-(((xs - cx) / spine_width) ** 2))

    lungs = tuple(
        _Ellipse(cx + side * 0.2 * sx, cy - 0.05 * sy, 0.145 * sx, 0.32 * sy, taper=0.45)
        for side in (-1, 1)
    )
    lung_mask = lungs[0].mask(xs, ys, 0.06) + lungs[1].mask(xs, ys, 0.06)
    ribs = np.maximum(np.cos(2 * np.pi * 7 * ((ys - cy) / sy + 1.6 * ((xs - cx) / sx) ** 2)), 0)
    markings = _smooth_noise(rng, 48, height, width)  # finer than any opacity
    image += lung_mask * (
        rng.uniform(6, 12) * ribs**3 + rng.uniform(2, 4) * markings - rng.uniform(55, 75)
    )
    return image, lungs, lung_mask


def _smooth_noise(rng: np.random.Generator, cells: int, height: int, width: int) -> np.ndarray:
    """Unit-scale noise, smooth over height/cells pixels; upsampling is faster than filtering."""
    coarse = Image.fromarray(rng.normal(0, 1, size=(cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))


def _add_opacity(
    rng: np.random.Generator,
    image: np.ndarray,
    lung: _Ellipse,
    extent_range: tuple[float, float],
    peak_range: tuple[float, float],
    max_extra_blobs: int,
) -> tuple[int, int, int, int]:
    """Add a soft bright blob of 1 + up to `max_extra_blobs` gaussians inside `lung`.

    Returns its box (x0, y0, x1, y1), measured on the rendered opacity, so it is exact in the
    file's pixels.
    """
    extent = rng.uniform(*extent_range) * 2 * lung.ax  # main blob's diameter at _BOX_LEVEL
    sigma_x = extent / (2 * _BOX_RADIUS)
    sigma_y = sigma_x * rng.uniform(0.9, 1.4)
    blobs = [_Blob(0.0, 0.0, sigma_x, sigma_y, 1.0)]
    for _ in range(int(rng.integers(0, max_extra_blobs + 1))):
        size = rng.uniform(0.5, 0.8)
        dx, dy = rng.uniform(-0.8, 0.8, size=2) * (sigma_x, sigma_y)
        blobs.append(_Blob(dx, dy, size * sigma_x, size * sigma_y, rng.uniform(0.6, 1.0)))
    half_x = max(abs(b.dx) + _BOX_RADIUS * b.sigma_x for b in blobs)
    half_y = max(abs(b.dy) + _BOX_RADIUS * b.sigma_y for b in blobs)
    cx, cy = _place_inside(rng, lung, half_x, half_y)

    reach = 3.5 / _BOX_RADIUS * max(half_x, half_y)  # where the gaussians have faded to ~0
    height, width = image.shape
    left, right = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
    top, bottom = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
    xs = np.arange(left, right, dtype=np.float32)
    ys = np.arange(top, bottom, dtype=np.float32)
    opacity = np.zeros((len(ys), len(xs)), dtype=np.float32)
    for blob in blobs:
        gx = np.exp(-0.5 * ((xs - cx - blob.dx) / blob.sigma_x) ** 2)
        gy = np.exp(-0.5 * ((ys - cy - blob.dy) / blob.sigma_y) ** 2)
        np.maximum(opacity, blob.weight * np.outer(gy, gx), out=opacity)
    opacity /= opacity.max()
    image[top:bottom, left:right] += rng.uniform(*peak_range) * opacity

    rows, cols = np.nonzero(opacity >= _BOX_LEVEL)
    x0, x1 = left + int(cols.min()), left + int(cols.max()) + 1
    y0, y1 = top + int(rows.min()), top + int(rows.max()) + 1
    return x0, y0, x1, y1


def _place_inside(
    rng: np.random.Generator, lung: _Ellipse, half_x: float, half_y: float
) -> tuple[float, float]:
    """A random centre whose box rim lies inside the shrunk lung; the lung centre if none fits.

    The margin keeps the mirrored box inside the other lung too, which the tests rely on.
    """
    rim = [(fx * half_x, fy * half_y) for fx in (-1, 0, 1) for fy in (-1, 0, 1)]
    for _ in range(100):
        x = rng.uniform(lung.cx - lung.ax, lung.cx + lung.ax)
        y = rng.uniform(lung.cy - lung.ay, lung.cy + lung.ay)
        if all(lung.r2(x + dx, y + dy) <= _LUNG_MARGIN**2 for dx, dy in rim):
            return x, y
    return lung.cx, lung.cy


def _brighten_lung_bases(
    rng: np.random.Generator, image: np.ndarray, lung: _Ellipse, lung_mask: np.ndarray
) -> None:
    """Bilateral, diffuse brightening, so a brighter lung alone does not mean PNEUMONIA."""
    ys = np.arange(image.shape[0], dtype=np.float32)[:, None]
    ramp = np.clip((ys - lung.cy) / lung.ay, 0, 1)
    image += rng.uniform(10, 25) * (lung_mask * ramp)


def _add_texture(rng: np.random.Generator, image: np.ndarray) -> None:
    """Exposure, smooth low-frequency shading and sensor noise, as in real radiographs.

    The shading is left-right symmetric, so that the lesion, not the exposure, is what makes
    one lung brighter than the other.
    """
    height, width = image.shape
    shading = _smooth_noise(rng, 4, height, width)
    image += rng.uniform(2, 3) * (shading + shading[:, ::-1])
    image *= rng.uniform(0.9, 1.1)
    image += rng.uniform(-8, 8) + rng.uniform(2, 5) * rng.standard_normal(
        (height, width), dtype=np.float32
    )


def _save_jpeg(pixels: np.ndarray, path: Path, *, rgb: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if rgb:  # some real Kaggle files are RGB JPEGs with three equal channels
        image = image.convert("RGB")
    image.save(path, format="JPEG", quality=_JPEG_QUALITY)
