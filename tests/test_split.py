import argparse
import json
import shutil

import pandas as pd
import pytest

from cxr.dataset import build_manifest
from cxr.demo import generate_demo_dataset
from cxr.splitting import connected_groups, split_dataset, split_report
from tools.cross_validate import FIGURES, fold_settings, parse_configs, summary, validation_figures


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("raw")
    generate_demo_dataset(root, patients=120, seed=3, min_side=40, max_side=56)
    # Byte-identical copies under other patients' names: one inside train, one of a test image.
    train_pneumonia = sorted((root / "train" / "PNEUMONIA").iterdir())
    shutil.copy(train_pneumonia[0], root / "train" / "PNEUMONIA" / "person9000_virus_1.jpeg")
    test_normal = sorted((root / "test" / "NORMAL").iterdir())[0]
    shutil.copy(test_normal, root / "train" / "NORMAL" / "IM-9001-0001.jpeg")
    return build_manifest(root)


def _split(manifest: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    return split_dataset(manifest, val_fraction=0.2, seed=seed, drop_test_patient_overlap=False)


def test_official_test_set_is_kept(manifest: pd.DataFrame):
    table = _split(manifest)
    official_test = set(manifest.loc[manifest["official_split"] == "test", "path"])
    assert set(table.loc[table["split"] == "test", "path"]) == official_test


def test_no_patient_and_no_identical_image_on_two_sides(manifest: pd.DataFrame):
    table = _split(manifest)
    report = split_report(table)
    for pair in report["overlap"].values():
        assert pair == {"patients": 0, "identical_images": 0}
    copy = table.set_index("path").loc["train/PNEUMONIA/person9000_virus_1.jpeg"]
    original = table[(table["sha256"] == copy["sha256"]) & (table["path"] != copy.name)]
    assert (original["split"] == copy["split"]).all()


def test_copy_of_a_test_image_is_excluded_from_training(manifest: pd.DataFrame):
    row = _split(manifest).set_index("path").loc["train/NORMAL/IM-9001-0001.jpeg"]
    assert row["split"] == "excluded"
    assert row["reason"] == "same bytes as a test image"


def test_validation_is_stratified_and_sized(manifest: pd.DataFrame):
    table = _split(manifest)
    pool = table[table["split"].isin(["train", "val"])]
    val = pool[pool["split"] == "val"]
    assert 0.12 < len(val) / len(pool) < 0.28
    share = (pool["label"] == "PNEUMONIA").mean()
    assert (val["label"] == "PNEUMONIA").mean() == pytest.approx(share, abs=0.08)


def test_split_is_deterministic_for_a_seed(manifest: pd.DataFrame):
    assert _split(manifest, seed=1).equals(_split(manifest, seed=1))
    assert not _split(manifest, seed=1)["split"].equals(_split(manifest, seed=2)["split"])


def test_unreadable_images_are_excluded_and_named(manifest: pd.DataFrame):
    broken = manifest.copy()
    broken.loc[0, ["readable", "error"]] = [False, "not a readable image file"]
    table = split_dataset(broken, 0.2, 0, drop_test_patient_overlap=False)
    assert table.loc[0, "split"] == "excluded"
    assert split_report(table)["excluded"] == {
        "unreadable": 1, "same bytes as a test image": 1,
    }  # fmt: skip


def test_patients_sharing_an_image_form_one_group():
    groups = connected_groups(
        pd.Series(["a", "a", "b", "c", "d"]), pd.Series(["h1", "h2", "h2", "h3", "h1"])
    )
    assert len({groups[0], groups[1], groups[2], groups[4]}) == 1
    assert groups[3] != groups[0]


def test_dropping_test_patient_ids(manifest: pd.DataFrame):
    collided = manifest.copy()
    test_patient = collided.loc[collided["official_split"] == "test", "patient_id"].iloc[0]
    first_train = collided.index[collided["official_split"] == "train"][0]
    collided.loc[first_train, "patient_id"] = test_patient
    kept = split_dataset(collided, 0.2, 0, drop_test_patient_overlap=False)
    dropped = split_dataset(collided, 0.2, 0, drop_test_patient_overlap=True)
    assert kept.loc[first_train, "split"] in ("train", "val")
    assert dropped.loc[first_train, "reason"] == "patient id in test set"


def test_the_folds_validate_every_pool_patient_exactly_once(manifest: pd.DataFrame):
    folds = [split_dataset(manifest, 0.2, 0, False, fold=fold) for fold in range(5)]
    assert folds[0].equals(_split(manifest))
    pool = folds[0]["split"].isin(["train", "val"])
    validated = pd.concat([table.loc[table["split"] == "val", "path"] for table in folds])
    assert validated.is_unique
    assert set(validated) == set(folds[0].loc[pool, "path"])
    for table in folds:
        assert table["split"].isin(["train", "val"]).equals(pool)  # test and excluded stay put
        assert split_report(table)["overlap"]["train/val"] == {"patients": 0, "identical_images": 0}
        assert set(table.loc[table["split"] == "val", "label"]) == {"NORMAL", "PNEUMONIA"}


def test_cross_validation_reads_validation_only_and_pairs_the_folds(tmp_path):
    settings = fold_settings(4, 3, ["lr=5e-4"])
    assert settings == ["split.val_fraction=0.25", "split.fold=3", "lr=5e-4"]
    val = {name: 0.5 for name in FIGURES} | {"log_loss": 0.25}
    test = {name: 0.9 for name in FIGURES}
    metrics = {"threshold": 0.5, "val": val, "test": test}
    (tmp_path / "evaluate.json").write_text(json.dumps(metrics))
    assert validation_figures(tmp_path / "evaluate.json") == val

    def folds(losses: list[float]) -> list[dict[str, float]]:
        return [{name: 0.5 for name in FIGURES} | {"log_loss": loss} for loss in losses]

    table = summary({"base": folds([0.10, 0.20, 0.30]), "new": folds([0.06, 0.14, 0.28])})
    rows = table.splitlines()
    assert rows[2].startswith("| base | 0.2000 ± 0.1000 | 0.5000 ± 0.0000 |")
    assert rows[3].startswith("| new | 0.1600 ± 0.1114 |")
    # Paired differences -0.04, -0.06, -0.02: mean -0.04, sd 0.02, standard error 0.02/sqrt(3).
    assert rows[4].startswith("| new minus base (paired) | -0.0400 ± 0.0115 | +0.0000 ± 0.0000 |")
    assert rows[-1] == "Lowest mean validation log_loss: new (0.1600)."


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (["a", "split.fold=1"], "--config a: 'split.fold=1': the folds set split.val_fraction"),
        (["a", "lr"], "--config a: 'lr' is not key=value"),
    ],
)
def test_cross_validation_refuses_settings_it_cannot_pair(config, message, capsys):
    with pytest.raises(SystemExit):
        parse_configs([config], argparse.ArgumentParser())
    assert message in capsys.readouterr().err
