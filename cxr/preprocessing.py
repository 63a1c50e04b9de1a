"""Decoding every image once into the folder `cxr.processed` describes, and the settings for it.

Used by the preprocess stage only (and by its benchmark), so a change to decoding re-runs
preprocess and nothing that merely reads its arrays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.images import ImageDecodeError, Intensity, ResizeMode, load_square
from cxr.params import Section
from cxr.processed import SPLITS


class PreprocessParams(Section):
    resize: ResizeMode  # how a non-square X-ray becomes square
    intensity: Intensity  # raw | equalize (per-image histogram equalization)


@dataclass(frozen=True)
class Decoded:
    path: str
    pixels: np.ndarray | None
    error: str = ""


def _decode(root: Path, size: int, mode: ResizeMode, intensity: Intensity, path: str) -> Decoded:
    try:
        return Decoded(path, load_square(root / path, size, mode, intensity))
    except ImageDecodeError as err:
        return Decoded(path, None, str(err))


def decode_all(
    root: Path,
    paths: list[str],
    size: int,
    mode: ResizeMode,
    workers: int,
    intensity: Intensity = "raw",
) -> list[Decoded]:
    """Decode images in parallel, in order; failures come back as errors, never exceptions."""
    decode = partial(_decode, root, size, mode, intensity)
    workers = workers or os.cpu_count() or 1
    progress = dict(total=len(paths), unit="img", desc="decode", smoothing=0.1)
    if workers == 1:
        return [decode(p) for p in tqdm(paths, **progress)]
    with Pool(workers) as pool:
        return list(tqdm(pool.imap(decode, paths, chunksize=8), **progress))


def normalization_stats(images: np.ndarray, chunk: int = 512) -> tuple[float, float]:
    """Mean and standard deviation of pixel values scaled to [0, 1]."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        total += block.sum()
        total_sq += np.square(block).sum()
        count += block.size
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))


def save_processed(
    folder: Path,
    index: pd.DataFrame,
    pixels: list[np.ndarray],
    size: int,
    resize: str,
    intensity: str = "raw",
) -> None:
    """Write one array per split, the index, and the training split's normalization stats.

    index: one row per image in `pixels` order, with split, path, label, patient_id, width,
    height.
    """
    index = index.assign(row=index.groupby("split").cumcount())
    for split in SPLITS:
        rows = np.flatnonzero(index["split"].to_numpy() == split)
        images = np.stack([pixels[i] for i in rows]) if len(rows) else np.empty((0, size, size))
        np.save(folder / f"{split}.npy", images.astype(np.uint8))
        if split == "train":
            mean, std = normalization_stats(images)
    columns = ["split", "row", "path", "label", "patient_id", "width", "height"]
    index[columns].to_csv(folder / "index.csv", index=False)
    stats = {
        "image_size": size, "resize": resize, "intensity": intensity, "mean": mean, "std": std
    }  # fmt: skip
    (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
