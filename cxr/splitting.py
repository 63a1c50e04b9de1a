"""Patient-grouped, class-stratified re-split of the official train+val images.

Kaggle's val folder holds 16 images, too few to choose a threshold or stop early on. The
official train and val images are pooled and re-split so that no patient and no byte-identical
image appears on both sides; the official test set is kept as the test set.

The pool is cut into k = round(1 / val_fraction) patient-grouped, class-stratified folds and
fold `split.fold` is validation, so the k choices of `fold` validate every patient exactly once:
tools/cross_validate.py runs a configuration on each to rank configurations more finely than
one validation split can.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from sklearn.model_selection import StratifiedGroupKFold

from cxr.params import Count, Section

SPLIT_COLUMNS = ["path", "label", "patient_id", "sha256", "split", "reason"]


class SplitParams(Section):
    val_fraction: Annotated[float, Field(gt=0, le=0.5)]
    fold: Count
    seed: Count
    drop_test_patient_overlap: bool

    @model_validator(mode="after")
    def _fold_exists(self) -> SplitParams:
        folds = fold_count(self.val_fraction)
        if self.fold >= folds:
            raise ValueError(
                f"split.fold must be below the {folds} folds that split.val_fraction "
                f"{self.val_fraction} makes (round(1 / val_fraction)), got {self.fold}"
            )
        return self


def fold_count(val_fraction: float) -> int:
    """Folds of the pool, one of which is validation: 0.15 makes 7 (14% validation)."""
    return max(2, round(1 / val_fraction))


def connected_groups(patients: pd.Series, hashes: pd.Series) -> np.ndarray:
    """Group id per image: images sharing a patient or identical bytes end up together."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for patient, digest in zip(patients, hashes, strict=True):
        parent[find(f"p:{patient}")] = find(f"h:{digest}")
    roots = [find(f"p:{patient}") for patient in patients]
    return pd.factorize(pd.Series(roots))[0]


def split_dataset(
    manifest: pd.DataFrame,
    val_fraction: float,
    seed: int,
    drop_test_patient_overlap: bool,
    fold: int = 0,
) -> pd.DataFrame:
    """Assign every readable image to train, val or test; leaked or unreadable ones to excluded."""
    table = manifest.assign(split="", reason="")
    table.loc[~table["readable"], ["split", "reason"]] = ["excluded", "unreadable"]
    is_test = table["readable"] & (table["official_split"] == "test")
    table.loc[is_test, "split"] = "test"

    pool = table["readable"] & ~is_test
    test_hashes = set(table.loc[is_test, "sha256"])
    same_bytes = pool & table["sha256"].isin(test_hashes)
    table.loc[same_bytes, ["split", "reason"]] = ["excluded", "same bytes as a test image"]
    if drop_test_patient_overlap:
        test_patients = set(table.loc[is_test, "patient_id"])
        same_patient = pool & ~same_bytes & table["patient_id"].isin(test_patients)
        table.loc[same_patient, ["split", "reason"]] = ["excluded", "patient id in test set"]

    pool_index = table.index[pool & (table["split"] == "")]
    pool_rows = table.loc[pool_index]
    groups = connected_groups(pool_rows["patient_id"], pool_rows["sha256"])
    splitter = StratifiedGroupKFold(fold_count(val_fraction), shuffle=True, random_state=seed)
    _, val_positions = list(splitter.split(pool_rows, pool_rows["label"], groups))[fold]
    table.loc[pool_index, "split"] = "train"
    table.loc[pool_index[val_positions], "split"] = "val"
    return table[SPLIT_COLUMNS]


def split_report(table: pd.DataFrame) -> dict:
    """Counts per split and class, patients per split, and every overlap (all must be 0)."""
    used = table[table["split"] != "excluded"]
    counts = used.groupby(["split", "label"]).size().unstack(fill_value=0)
    report: dict = {
        "images": {split: {k: int(v) for k, v in row.items()} for split, row in counts.iterrows()},
        "patients": used.groupby("split")["patient_id"].nunique().astype(int).to_dict(),
        "overlap": {},
        "excluded": table.loc[table["split"] == "excluded", "reason"].value_counts().to_dict(),
    }
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        a, b = used[used["split"] == first], used[used["split"] == second]
        report["overlap"][f"{first}/{second}"] = {
            "patients": len(set(a["patient_id"]) & set(b["patient_id"])),
            "identical_images": len(set(a["sha256"]) & set(b["sha256"])),
        }
    return report


def count_test_patient_collisions(manifest: pd.DataFrame) -> int:
    """Patient ids that name images both in the official test set and in train/val."""
    readable = manifest[manifest["readable"]]
    is_test = readable["official_split"] == "test"
    return len(set(readable.loc[is_test, "patient_id"]) & set(readable.loc[~is_test, "patient_id"]))
