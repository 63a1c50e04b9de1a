"""The Kaggle layout and the manifest every data source ends in (see docs/design.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cxr.atomic import sha256_of
from cxr.classes import CLASSES
from cxr.images import ImageDecodeError, image_size

OFFICIAL_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
MANIFEST_COLUMNS = [
    "path", "label", "official_split", "patient_id", "sha256", "width", "height", "readable",
    "error",
]  # fmt: skip

# Kermany file names carry the patient: person1000_bacteria_2931.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0927-0001.jpeg. A name that matches neither is its own patient.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+"),
)


def patient_id(file_name: str) -> str:
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return Path(file_name).stem


def build_manifest(root: Path) -> pd.DataFrame:
    """One row per file in the layout; unreadable files are kept and flagged, not dropped."""
    rows = []
    for split in OFFICIAL_SPLITS:
        for label in CLASSES:
            folder = root / split / label
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    rows.append(_manifest_row(root, path, split, label))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _manifest_row(root: Path, path: Path, split: str, label: str) -> dict:
    row = {
        "path": path.relative_to(root).as_posix(),
        "label": label,
        "official_split": split,
        "patient_id": f"{label}/{patient_id(path.name)}",
        "sha256": sha256_of(path),
        "width": 0,
        "height": 0,
        "readable": True,
        "error": "",
    }
    try:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageDecodeError(f"{path}: not an image file name ({path.suffix or 'no suffix'})")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file (0 bytes)")
        row["width"], row["height"] = image_size(path)
    except ImageDecodeError as err:
        row["readable"], row["error"] = False, str(err).removeprefix(f"{path}: ")
    return row
