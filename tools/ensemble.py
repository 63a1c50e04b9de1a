"""Members and their ensemble side by side, across experiments: what the ensemble stage does
within one pipeline, for networks trained in separate runs (another image size, another recipe).

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

from cxr.params import load_params
from stages.ensemble import report
from stages.evaluate import Params


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


def row(name: str, table: pd.DataFrame, probs: np.ndarray, params: Params) -> dict:
    """One model's column: the ensemble stage's report of it, flattened (the probabilities are
    already calibrated, so their `_uncalibrated` figures are the same)."""
    result = report(probs, probs, table, params.evaluate, params.seed)
    flat = {"model": name, "threshold": result["threshold"]}
    for split in ("val", "test"):
        flat |= {f"{split} {key}": value for key, value in result[split].items()}
    test = result["test"]
    flat["test AUC 95% CI"] = f"[{test['roc_auc_ci_low']}, {test['roc_auc_ci_high']}]"
    for key in ("accuracy", "sensitivity", "specificity"):
        flat[f"nb {key}"] = result["test_notebook_protocol"][key]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="DVC experiments or git revisions (members)")
    args = parser.parse_args()
    params = load_params(Params)
    table, probs = member_probabilities(args.revs)
    rows = [row(rev, table, p, params) for rev, p in probs.items()]
    if len(probs) > 1:
        mean = np.mean(list(probs.values()), axis=0)
        rows.append(row("ensemble (mean probability)", table, mean, params))
    print(pd.DataFrame(rows).set_index("model").T.to_string())


if __name__ == "__main__":
    main()
