"""Score the trained model on validation and the official test set.

The decision threshold is chosen on validation only and then applied unchanged to test; it is
stored beside the model (models/threshold.json) for inference.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from cxr import tracking
from cxr.atomic import write_csv, write_json
from cxr.dataset import CLASSES
from cxr.evaluation import (
    bootstrap_intervals,
    choose_threshold,
    classification_metrics,
    curve_tables,
    save_figures,
)
from cxr.model import THRESHOLD_FILE, Classifier
from cxr.params import EvaluateParams, load_params
from cxr.processed import ProcessedSplit, load_split
from cxr.stage import run
from cxr.training import pick_device

MODEL_FILE = Path("models/model.pt")
METRICS_FILE = Path("metrics/evaluate.json")
PLOTS_DIR = Path("plots/evaluate")
PREDICTIONS = Path("data/predictions.csv")


def split_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, settings: EvaluateParams, seed: int
) -> dict:
    """Point metrics plus flat 95% bootstrap bounds (`roc_auc_ci_low`), easy to read in a diff."""
    metrics = classification_metrics(labels, probs, threshold, settings.calibration_bins)
    intervals = bootstrap_intervals(labels, probs, threshold, settings.bootstrap, seed)
    for name, (low, high) in intervals.items():
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    return metrics


def save_plot_data(split: str, labels: np.ndarray, probs: np.ndarray, threshold: float, bins: int):
    for kind, table in curve_tables(labels, probs, threshold, bins).items():
        write_csv(PLOTS_DIR / f"{split}_{kind}.csv", table)
    return save_figures(PLOTS_DIR / "figures", split, labels, probs, threshold, bins)


def predictions_table(split: str, data: ProcessedSplit, probs: np.ndarray, threshold: float):
    return pd.DataFrame(
        {
            "path": data.index["path"],
            "split": split,
            "label": data.index["label"],
            "probability": probs.round(6),
            "predicted": np.where(probs >= threshold, CLASSES[1], CLASSES[0]),
        }
    )


def main() -> None:
    params = load_params()
    settings = params.evaluate
    classifier = Classifier.load(MODEL_FILE, device=str(pick_device(params.train.device)))
    classifier.flip_tta = settings.flip_tta
    splits = {"val": load_split("val"), "test": load_split("test")}
    probs = {name: classifier.predict_proba(np.asarray(s.images)) for name, s in splits.items()}

    threshold = choose_threshold(
        splits["val"].labels,
        probs["val"],
        settings.threshold,
        settings.fixed_threshold,
        settings.target_sensitivity,
    )
    report: dict = {"threshold": round(threshold, 6)}
    figures, predictions = [], []
    for name, data in splits.items():
        report[name] = split_metrics(data.labels, probs[name], threshold, settings, params.seed)
        figures += save_plot_data(
            name, data.labels, probs[name], threshold, settings.calibration_bins
        )
        predictions.append(predictions_table(name, data, probs[name], threshold))

    write_json(METRICS_FILE, report)
    write_json(
        MODEL_FILE.parent / THRESHOLD_FILE,
        {
            "threshold": threshold,
            "strategy": settings.threshold,
            "flip_tta": settings.flip_tta,
            "chosen_on": "validation",
        },
    )
    write_csv(PREDICTIONS, pd.concat(predictions, ignore_index=True))

    with tracking.reopen_training_run(params, classifier.card.mlflow_run_id):
        mlflow.set_tag("evaluate.threshold_strategy", settings.threshold)
        mlflow.set_tag("evaluate.flip_tta", settings.flip_tta)
        flat = {
            f"{split}_{k}": v
            for split in splits
            for k, v in report[split].items()
            if isinstance(v, (int, float))
        }
        mlflow.log_metrics({"threshold": threshold, **flat})
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")

    for name in splits:
        m = report[name]
        print(
            f"{name:>4}: AUC {m['roc_auc']} [{m.get('roc_auc_ci_low')}, {m.get('roc_auc_ci_high')}]"
            f"  accuracy {m['accuracy']}  sensitivity {m['sensitivity']}"
            f"  specificity {m['specificity']}  F1 {m['f1']}"
        )
    print(f"threshold {threshold:.4f} ({settings.threshold}, chosen on validation)")


if __name__ == "__main__":
    run(main)
