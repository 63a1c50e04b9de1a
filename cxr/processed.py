"""The preprocessed dataset as every stage after preprocess reads it: one uint8 array per
split, decoded once, read at memory speed.

Layout of the folder (data/processed/ in dvc.yaml): `{train,val,test}.npy` (N x size x size,
uint8, memory-mappable), `index.csv` (one row per array row: split, row, path, label,
patient_id, width, height), `stats.json` (normalization and how the images were made square),
`rejected.csv`. `cxr.preprocessing` writes it; the split is kept apart so that training and
evaluation do not depend on the image decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.classes import CLASSES

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProcessedSplit:
    images: np.ndarray  # (N, size, size) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64, 1 = PNEUMONIA
    index: pd.DataFrame


def load_split(split: str, folder: Path) -> ProcessedSplit:
    index = pd.read_csv(folder / "index.csv", keep_default_na=False)
    rows = index[index["split"] == split].sort_values("row").reset_index(drop=True)
    images = np.load(folder / f"{split}.npy", mmap_mode="r")
    if len(images) != len(rows):
        raise ValueError(f"{folder}/{split}.npy has {len(images)} rows, index.csv {len(rows)}")
    labels = rows["label"].map(CLASSES.index).to_numpy(dtype=np.int64)
    return ProcessedSplit(images, labels, rows)


def load_stats(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text())
