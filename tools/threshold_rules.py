"""How steady each threshold rule is on VALIDATION predictions: the evidence for evaluate.threshold.

Reads only the `val` rows of data/predictions.csv (never the test rows), resamples validation
patients with replacement, re-chooses the threshold with each rule on every resample, and
prints the threshold on the full validation set, its validation sensitivity and specificity,
and the spread of the resampled thresholds in logit units. A rule whose threshold jumps between
resamples of the same population is a poor bet for a shifted one.

Run from the repository root after `dvc repro`:  .venv/bin/python tools/threshold_rules.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.classes import CLASSES
from cxr.evaluation import choose_threshold

RULES = [  # (strategy, youden tolerance, target sensitivity)
    ("youden", 0.0, 0.0),
    ("youden_middle", 0.01, 0.0),
    ("youden_middle", 0.02, 0.0),
    ("sensitivity", 0.0, 0.95),
    ("sensitivity", 0.0, 0.98),
]


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, default=Path("data/predictions.csv"))
    parser.add_argument("--index", type=Path, default=Path("data/processed/index.csv"))
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    predictions = pd.read_csv(args.predictions, keep_default_na=False)
    val = predictions[predictions["split"] == "val"]
    index = pd.read_csv(args.index, keep_default_na=False)[["path", "patient_id"]]
    val = val.merge(index, on="path", validate="one_to_one")
    labels = val["label"].map(CLASSES.index).to_numpy()
    probs = val["probability"].to_numpy()
    rows_of = [np.flatnonzero(g) for g in pd.get_dummies(val["patient_id"]).to_numpy().T]
    rng = np.random.default_rng(args.seed)
    samples = [
        np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])
        for _ in range(args.resamples)
    ]
    print(
        f"{len(val)} validation images, {len(rows_of)} patients, {args.resamples} patient "
        "resamples\n"
        f"{'rule':<28} {'threshold':>9} {'val sens':>8} {'val spec':>8} {'logit sd':>8} "
        f"{'5%-95% threshold':>17}"
    )
    for strategy, tolerance, target in RULES:
        chosen = choose_threshold(labels, probs, strategy, 0.5, target, tolerance)
        resampled = np.array(
            [
                choose_threshold(labels[s], probs[s], strategy, 0.5, target, tolerance)
                for s in samples
            ]
        )
        spread = np.std([logit(t) for t in resampled])
        low, high = np.quantile(resampled, [0.05, 0.95])
        positive = probs >= chosen
        sens = positive[labels == 1].mean()
        spec = (~positive)[labels == 0].mean()
        name = (
            strategy + (f" tol {tolerance}" if tolerance else "") + (f" {target}" if target else "")
        )
        print(
            f"{name:<28} {chosen:>9.3f} {sens:>8.3f} {spec:>8.3f} {spread:>8.2f} "
            f"{f'{low:.3f}-{high:.3f}':>17}"
        )


if __name__ == "__main__":
    main()
