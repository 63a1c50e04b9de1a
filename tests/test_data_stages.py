import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr import preprocessing
from cxr.images import load_square
from cxr.params import ParamsError
from cxr.stage import StageError
from stages import download, preprocess, split, validate
from tests.conftest import set_params, sh, stage_argv, tool_env


def _download() -> None:
    validate.main(stage_argv(Path("."), "validate"))
    download.main(stage_argv(Path("."), "download"))


def _run_data_stages() -> None:
    _download()
    split.main(stage_argv(Path("."), "split"))
    preprocess.main(stage_argv(Path("."), "preprocess"))


def _local_source(folder: Path) -> Path:
    """A small Kaggle-layout folder made of demo images, plus broken files."""
    from cxr.demo import generate_demo_dataset

    generate_demo_dataset(folder, patients=24, seed=1, min_side=48, max_side=64)
    train_pneumonia = folder / "train" / "PNEUMONIA"
    good = sorted(train_pneumonia.iterdir())[0].read_bytes()
    (train_pneumonia / "person900_bacteria_1.jpeg").write_bytes(b"")
    (train_pneumonia / "person901_bacteria_2.jpeg").write_text("not an image")
    (train_pneumonia / "person902_bacteria_3.jpeg").write_bytes(good[: len(good) // 2])
    return folder


def test_demo_source_builds_every_data_output(project: Path):
    _run_data_stages()
    manifest = pd.read_csv("data/raw/manifest.csv", keep_default_na=False)
    assert set(manifest["official_split"]) == {"train", "val", "test"}
    assert manifest["readable"].all()
    assert manifest["sha256"].str.len().eq(64).all()
    lesions = pd.read_csv("data/raw/lesions.csv")
    assert set(lesions["path"]) == set(manifest.loc[manifest["label"] == "PNEUMONIA", "path"])

    report = json.loads(Path("data/splits/report.json").read_text())
    assert all(v == {"patients": 0, "identical_images": 0} for v in report["overlap"].values())

    index = pd.read_csv("data/processed/index.csv", keep_default_na=False)
    size = 32
    for name in ("train", "val", "test"):
        images = np.load(f"data/processed/{name}.npy", mmap_mode="r")
        rows = index[index["split"] == name].sort_values("row")
        assert images.dtype == np.uint8
        assert images.shape == (len(rows), size, size)
        for row in rows.head(3).itertuples():
            expected = load_square(Path("data/raw") / row.path, size, "pad")
            assert np.array_equal(images[row.row], expected)
    stats = json.loads(Path("data/processed/stats.json").read_text())
    train = np.load("data/processed/train.npy").astype(np.float64) / 255
    assert stats["mean"] == pytest.approx(train.mean())
    assert stats["std"] == pytest.approx(train.std())


def test_broken_files_are_reported_by_name_and_excluded(project: Path, tmp_path: Path):
    source = _local_source(tmp_path / "source")
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    set_params(project, {"data": {"source": "local", "local_path": str(source)}})
    _run_data_stages()
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before

    manifest = pd.read_csv("data/raw/manifest.csv", keep_default_na=False).set_index("path")
    folder = "train/PNEUMONIA/"
    assert manifest.loc[folder + "person900_bacteria_1.jpeg", "error"] == "empty file (0 bytes)"
    assert manifest.loc[folder + "person901_bacteria_2.jpeg", "error"] == (
        "not a readable image file"
    )
    table = pd.read_csv("data/splits/split.csv", keep_default_na=False).set_index("path")
    assert table.loc[folder + "person900_bacteria_1.jpeg", "split"] == "excluded"

    rejected = pd.read_csv("data/processed/rejected.csv")
    assert rejected["path"].tolist() == [folder + "person902_bacteria_3.jpeg"]
    assert "person902_bacteria_3.jpeg" in rejected["error"][0]
    index = pd.read_csv("data/processed/index.csv")
    assert not index["path"].str.contains("person90[012]_").any()


def test_relative_local_path_is_relative_to_the_project_dvc_names(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # `dvc exp run --queue/--temp` runs in .dvc/tmp/exps/<run>/ and sets DVC_ROOT to the project.
    _local_source(project / "xrays")
    workspace = project / ".dvc" / "tmp" / "exps" / "run1"
    shutil.copytree(project, workspace, ignore=shutil.ignore_patterns(".dvc", "xrays"))
    set_params(workspace, {"data": {"source": "local", "local_path": "xrays"}})
    monkeypatch.chdir(workspace)
    with pytest.raises(StageError, match="xrays"):
        _download()
    monkeypatch.setenv("DVC_ROOT", str(project))
    _download()
    manifest = pd.read_csv("data/raw/manifest.csv", keep_default_na=False)
    assert len(manifest) == sum(1 for p in (project / "xrays").rglob("*") if p.is_file())


def test_missing_class_folder_fails_before_writing(project: Path, tmp_path: Path):
    source = _local_source(tmp_path / "source")
    shutil.rmtree(source / "test" / "NORMAL")
    set_params(project, {"data": {"source": "local", "local_path": str(source)}})
    with pytest.raises(StageError, match=r"test/NORMAL"):
        _download()
    assert not Path("data/raw").exists()


def test_unknown_source_fails_before_any_work(project: Path):
    set_params(project, {"data": {"source": "ftp"}})
    expected = r"data\.source: Input should be 'demo', 'kaggle', 'url' or 'local', got 'ftp'"
    with pytest.raises(ParamsError, match=expected):
        download.main(stage_argv(Path("."), "download"))
    assert not Path("data").exists()


def test_empty_split_is_a_clear_error(project: Path):
    _download()
    split.main(stage_argv(Path("."), "split"))
    table = pd.read_csv("data/splits/split.csv", keep_default_na=False)
    table.loc[table["split"] == "val", "split"] = "excluded"
    table.to_csv("data/splits/split.csv", index=False)
    with pytest.raises(StageError, match="the val split is empty"):
        preprocess.main(stage_argv(Path("."), "preprocess"))
    assert not Path("data/processed").exists()


def test_interrupted_preprocess_leaves_no_output(project: Path, monkeypatch: pytest.MonkeyPatch):
    _download()
    split.main(stage_argv(Path("."), "split"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocessing, "normalization_stats", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess.main(stage_argv(Path("."), "preprocess"))
    assert not Path("data/processed").exists()
    assert not list(Path("data").glob(".processed*"))


@pytest.mark.slow
def test_dvc_repro_builds_data_then_has_nothing_to_do(project: Path, tmp_path: Path):
    env = tool_env(tmp_path)
    sh(project, "git", "init", "-q", env=env)
    sh(project, sys.executable, "-m", "dvc", "init", "-q", env=env)
    out = sh(project, sys.executable, "-m", "dvc", "repro", "preprocess", env=env)
    assert "Running stage 'preprocess'" in out
    assert Path("data/processed/train.npy").is_file()
    assert Path("dvc.lock").is_file()
    again = sh(project, sys.executable, "-m", "dvc", "repro", "preprocess", env=env)
    assert "Running stage" not in again
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert lock["preprocess"]["params"]["params.yaml"]["image_size"] == 32
    assert lock["download"]["params"]["params.yaml"]["data"]["source"] == "demo"


def test_equalize_option_reaches_the_arrays_and_the_stats(project: Path):
    set_params(project, {"preprocess": {"intensity": "equalize"}})
    _run_data_stages()
    stats = json.loads(Path("data/processed/stats.json").read_text())
    assert stats["intensity"] == "equalize"
    index = pd.read_csv("data/processed/index.csv", keep_default_na=False)
    images = np.load("data/processed/test.npy")
    for row in index[index["split"] == "test"].head(3).itertuples():
        expected = load_square(Path("data/raw") / row.path, 32, "pad", "equalize")
        assert np.array_equal(images[row.row], expected)
        assert not np.array_equal(expected, load_square(Path("data/raw") / row.path, 32, "pad"))
