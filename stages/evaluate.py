"""Score the trained model on validation and the official test set.

The decision threshold is chosen on validation only and then applied unchanged to test; it is
stored beside the model (models/threshold.json) for inference. Intervals resample patients,
not images (see `bootstrap_intervals`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from cxr import serving, tracking
from cxr.atomic import write_csv, write_json
from cxr.classifier import Classifier
from cxr.dataset import CLASSES
from cxr.device import pick_device, use_cpu_threads
from cxr.evaluation import (
    bootstrap_intervals,
    choose_threshold,
    classification_metrics,
    curve_tables,
)
from cxr.figures import save_figures
from cxr.params import EvaluateParams, load_params
from cxr.processed import ProcessedSplit, load_split
from cxr.stage import paths, require, run


def split_metrics(
    data: ProcessedSplit, probs: np.ndarray, threshold: float, settings: EvaluateParams, seed: int
) -> dict:
    """Point metrics plus flat 95% bootstrap bounds (`roc_auc_ci_low`), easy to read in a diff."""
    labels, patients = data.labels, data.index["patient_id"]
    metrics = classification_metrics(labels, probs, threshold, settings.calibration_bins)
    metrics["patients"] = int(patients.nunique())
    intervals = bootstrap_intervals(labels, probs, patients, threshold, settings.bootstrap, seed)
    for name, (low, high) in intervals.items():
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    return metrics


def save_plot_data(
    folder: Path,
    split: str,
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    metrics: dict,
    bins: int,
) -> list[Path]:
    """Curve tables for `dvc plots`, and the same curves as PNGs for MLflow and reports."""
    tables = curve_tables(labels, probs, threshold, bins)
    for kind, table in tables.items():
        write_csv(folder / f"{split}_{kind}.csv", table)
    return save_figures(folder / "figures", split, tables, metrics, probs, threshold, bins)


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


def main(argv: list[str] | None = None) -> None:
    args = paths(
        __doc__,
        *("model", "guard", "processed", "threshold", "predictions", "metrics", "plots"),
        argv=argv,
    )
    params = load_params()
    use_cpu_threads(params.runtime.threads)
    settings = params.evaluate
    require(args.model, args.guard, args.processed)
    device = str(pick_device(params.runtime.device))
    classifier = Classifier.load(args.model, device=device, with_guard=False)
    classifier.flip_tta = settings.flip_tta  # the threshold is chosen below, with this setting
    splits = {name: load_split(name, args.processed) for name in ("val", "test")}
    probs = {name: classifier.predict_proba(np.asarray(s.images)) for name, s in splits.items()}

    threshold = choose_threshold(
        splits["val"].labels,
        probs["val"],
        settings.threshold,
        settings.fixed_threshold,
        settings.target_sensitivity,
        settings.youden_tolerance,
    )
    report: dict = {"threshold": round(threshold, 6)}
    figures, predictions = [], []
    for name, data in splits.items():
        report[name] = split_metrics(data, probs[name], threshold, settings, params.seed)
        figures += save_plot_data(
            args.plots,
            name,
            data.labels,
            probs[name],
            threshold,
            report[name],
            settings.calibration_bins,
        )
        predictions.append(predictions_table(name, data, probs[name], threshold))

    write_json(args.metrics, report)
    write_json(
        args.threshold,
        {
            "threshold": threshold,
            "strategy": settings.threshold,
            "flip_tta": settings.flip_tta,
            "chosen_on": "validation",
        },
    )
    write_csv(args.predictions, pd.concat(predictions, ignore_index=True))

    with tracking.start_stage_run(
        params.mlflow.experiment,
        params.mlflow.tracking_uri,
        classifier.card.mlflow_run_id,
        "evaluate",
    ):
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
        # The deployable model, registered once its threshold is known (README, Deploy).
        version = serving.register(
            args.model,
            args.threshold,
            args.guard,
            params.mlflow.registered_model,
            serving.encode_png(np.asarray(splits["val"].images[0])),
            serving.describe(classifier, report, settings.threshold),
            {**tracking.run_tags(), "training_run_id": classifier.card.mlflow_run_id},
        )

    for name in splits:
        m = report[name]
        print(
            f"{name:>4}: AUC {m['roc_auc']} [{m.get('roc_auc_ci_low')}, {m.get('roc_auc_ci_high')}]"
            f"  accuracy {m['accuracy']}  sensitivity {m['sensitivity']}"
            f"  specificity {m['specificity']}  F1 {m['f1']}  ({m['n']} images,"
            f" {m['patients']} patients)"
        )
    print(f"threshold {threshold:.4f} ({settings.threshold}, chosen on validation)")
    print(f"registered models:/{version.name}@{serving.CANDIDATE} (version {version.version})")


if __name__ == "__main__":
    run(main)
