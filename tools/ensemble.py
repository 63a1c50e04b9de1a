"""Members and their ensemble side by side: the evidence for an ensemble, before the pipeline
builds one.

Each argument is a DVC experiment (or any git revision) whose evaluate stage ran; its calibrated
probabilities come from its `data/predictions.csv` in the DVC cache, the patients from its
`data/processed/index.csv`. The ensemble is the mean of the members' calibrated probabilities;
its threshold is chosen on validation by `evaluate.threshold` of params.yaml, as the evaluate
stage chooses a model's. Validation columns rank; test columns are reported, and the last
ones (`nb`) are the older projects' protocol (the threshold of best test accuracy, picked on the
test set), for comparison only.

Run from the repository root:  .venv/bin/python -m tools.ensemble EXP [EXP ...]
"""

from __future__ import annotations

import argparse

import dvc.api
import numpy as np
import pandas as pd

from cxr.classes import CLASSES
from cxr.evaluation import choose_threshold
from cxr.params import load_params
from stages.evaluate import Params, notebook_protocol, split_metrics


def read_csv(path: str, rev: str) -> pd.DataFrame:
    with dvc.api.open(path, rev=rev) as file:
        return pd.read_csv(file, keep_default_na=False)


def member_probabilities(revs: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The shared image table (path, split, label, patient) and each member's probabilities,
    checked to score the same images in the same order."""
    table, probs = None, {}
    for rev in revs:
        predictions = read_csv("data/predictions.csv", rev)
        index = read_csv("data/processed/index.csv", rev)[["path", "patient_id"]]
        images = predictions[["path", "split", "label"]].merge(index, on="path", how="left")
        if table is None:
            table = images
        elif not table[["path", "split", "label"]].equals(images[["path", "split", "label"]]):
            raise SystemExit(f"{rev} scored other images than {revs[0]}: not one split")
        probs[rev] = predictions["probability"].to_numpy(float)
    return table, probs


def report(name: str, table: pd.DataFrame, probs: np.ndarray, params: Params) -> dict:
    settings = params.evaluate
    labels = (table["label"] == CLASSES[1]).to_numpy(int)
    val, test = (table["split"] == "val").to_numpy(), (table["split"] == "test").to_numpy()
    threshold = choose_threshold(
        labels[val], probs[val], settings.threshold, settings.fixed_threshold,
        settings.target_sensitivity, settings.youden_tolerance,
    )  # fmt: skip
    row = {"model": name, "threshold": round(threshold, 4)}
    for split, rows in (("val", val), ("test", test)):
        metrics = split_metrics(
            labels[rows], table["patient_id"][rows], probs[rows], probs[rows], threshold,
            settings, params.seed,
        )  # fmt: skip
        for key in ("roc_auc", "log_loss", "brier", "ece", "specificity_at_95_sensitivity"):
            row[f"{split} {key}"] = metrics[key]
        if split == "test":
            row["test AUC 95% CI"] = f"[{metrics['roc_auc_ci_low']}, {metrics['roc_auc_ci_high']}]"
            for key in ("accuracy", "sensitivity", "specificity"):
                row[f"test {key}"] = metrics[key]
    notebook = notebook_protocol(labels[test], probs[test], settings.calibration_bins)
    for key in ("accuracy", "sensitivity", "specificity"):
        row[f"nb {key}"] = notebook[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="DVC experiments or git revisions (members)")
    args = parser.parse_args()
    params = load_params(Params)
    table, probs = member_probabilities(args.revs)
    rows = [report(rev, table, p, params) for rev, p in probs.items()]
    if len(probs) > 1:
        mean = np.mean(list(probs.values()), axis=0)
        rows.append(report("ensemble (mean probability)", table, mean, params))
    print(pd.DataFrame(rows).set_index("model").T.to_string())


if __name__ == "__main__":
    main()
