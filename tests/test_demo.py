"""The synthetic dataset must look like the Kaggle layout to every stage, and be reproducible."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.demo import generate_demo_dataset

SIDES = {"min_side": 64, "max_side": 96}
NAME_PATTERNS = {
    "NORMAL": re.compile(r"(?P<patient>(?:NORMAL2-)?IM-\d{4})-\d{4}\.jpeg"),
    "PNEUMONIA": re.compile(r"(?P<patient>person\d+)_(?:bacteria|virus)_(?P<number>\d+)\.jpeg"),
}


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("demo") / "chest_xray"
    return root, generate_demo_dataset(root, patients=80, seed=3, **SIDES)


def test_same_arguments_give_identical_bytes_and_table(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()  # an existing but empty folder is fine
    first = generate_demo_dataset(tmp_path / "a", patients=24, seed=7, **SIDES)
    second = generate_demo_dataset(tmp_path / "b", patients=24, seed=7, **SIDES)
    other = generate_demo_dataset(tmp_path / "c", patients=24, seed=8, **SIDES)

    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)
    shared = _digests(tmp_path / "a").items() & _digests(tmp_path / "c").items()
    assert not shared, "a different seed must change the files"
    assert not first.equals(other)


def test_layout_names_and_patient_splits(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, _ = dataset
    folders = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir())
    assert folders == [
        f"{split}/{label}" for split in ("test", "train", "val") for label in NAME_PATTERNS
    ]
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val"]

    splits_of: dict[str, set[str]] = {}
    numbers = []
    for path in root.rglob("*.jpeg"):
        split, label = path.parent.parent.name, path.parent.name
        match = NAME_PATTERNS[label].fullmatch(path.name)
        assert match, f"{path.name} does not follow the Kaggle naming of {label}"
        splits_of.setdefault(match["patient"], set()).add(split)
        if label == "PNEUMONIA":
            numbers.append(int(match["number"]))
    assert len(list(root.rglob("*"))) == len(list(root.rglob("*.jpeg"))) + 9  # 3 + 6 folders

    assert all(len(splits) == 1 for splits in splits_of.values()), "a patient straddles splits"
    assert len(numbers) == len(set(numbers)), "PNEUMONIA image numbers must be unique"
    normal_ids = [int(name[-4:]) for name in splits_of if not name.startswith("person")]
    assert len(normal_ids) == len(set(normal_ids)), "IM- and NORMAL2-IM- ids must not overlap"
    assert any(name.startswith("NORMAL2-") for name in splits_of)
    assert any(name.startswith("IM-") for name in splits_of)
    for label in NAME_PATTERNS:
        val = list((root / "val" / label).glob("*.jpeg"))
        assert 2 <= len(val) <= 4
        patients = {NAME_PATTERNS[label].fullmatch(p.name)["patient"] for p in val}
        assert len(patients) == len(val), "val images come from distinct patients"
        for split in ("train", "test"):
            assert any((root / split / label).glob("*.jpeg"))


def test_class_ratio_is_about_one_to_three(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, _ = dataset
    normal = len(list(root.glob("*/NORMAL/*.jpeg")))
    pneumonia = len(list(root.glob("*/PNEUMONIA/*.jpeg")))
    assert 0.6 <= pneumonia / (normal + pneumonia) <= 0.85
    assert 150 <= normal + pneumonia <= 250  # about 2.5 images per patient


def test_sizes_vary_within_bounds_and_a_few_files_are_rgb(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    root, _ = dataset
    sizes, modes = set(), []
    for path in root.rglob("*.jpeg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
            modes.append(image.mode)
    assert all(64 <= side <= 96 for size in sizes for side in size)
    assert len(sizes) > 20
    assert any(width > height for width, height in sizes)
    assert any(width < height for width, height in sizes)
    assert set(modes) == {"L", "RGB"}
    assert 1 <= modes.count("RGB") <= 0.1 * len(modes)


def test_lesion_boxes_mark_a_visible_opacity(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, table = dataset
    assert list(table.columns) == ["path", "x0", "y0", "x1", "y1"]
    pneumonia = sorted(p.relative_to(root).as_posix() for p in root.glob("*/PNEUMONIA/*"))
    assert sorted(table["path"]) == pneumonia

    contrasts = []
    for row in table.itertuples():
        pixels = np.asarray(Image.open(root / row.path).convert("L"), dtype=np.float64)
        height, width = pixels.shape
        assert 0 <= row.x0 < row.x1 <= width and 0 <= row.y0 < row.y1 <= height
        assert row.x1 - row.x0 >= 3 and row.y1 - row.y0 >= 3
        mirrored = pixels[row.y0 : row.y1, width - row.x1 : width - row.x0]
        lesion = pixels[row.y0 : row.y1, row.x0 : row.x1]
        assert lesion.mean() > mirrored.mean(), f"no visible opacity in {row.path}"
        contrasts.append(lesion.mean() - mirrored.mean())
    assert np.median(contrasts) > 10


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        generate_demo_dataset(tmp_path, patients=8, seed=0, **SIDES)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
