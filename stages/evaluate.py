"""Score the trained model on validation and the official test set.

The decision threshold is chosen on validation only (all its images) and then applied unchanged
to test; it is stored beside the model (models/threshold.json) for inference. Intervals resample
patients, not images (see `bootstrap_intervals`).

The deployed model diagnoses only what its input guard lets through, so each split is reported
twice: over all images (`test`), as a bare network would be judged, and over the images the
guard accepts (`test_accepted`), with the share it refuses (`test.refused`) beside them.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from cxr import serving, tracking
from cxr.atomic import write_csv, write_json
from cxr.classifier import Assessment, Classifier
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
    labels: np.ndarray,
    patients: pd.Series,
    probs: np.ndarray,
    threshold: float,
    settings: EvaluateParams,
    seed: int,
) -> dict:
    """Point metrics plus flat 95% bootstrap bounds (`roc_auc_ci_low`), easy to read in a diff."""
    if labels.size == 0:  # the guard refused every image
        return {"n": 0}
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


def predictions_table(
    split: str, data: ProcessedSplit, assessment: Assessment, threshold: float
) -> pd.DataFrame:
    probs = assessment.probability
    return pd.DataFrame(
        {
            "path": data.index["path"],
            "split": split,
            "label": data.index["label"],
            "probability": probs.round(6),
            "predicted": np.where(probs >= threshold, CLASSES[1], CLASSES[0]),
            "ood_score": assessment.ood_score,
            "refused": assessment.out_of_distribution,
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
    classifier = Classifier.load(
        args.model, device=device, guard_file=args.guard, with_threshold=False
    )
    classifier.flip_tta = settings.flip_tta  # the threshold is chosen below, with this setting
    splits = {name: load_split(name, args.processed) for name in ("val", "test")}
    assessed = {name: classifier.assess(np.asarray(s.images)) for name, s in splits.items()}
    probs = {name: a.probability for name, a in assessed.items()}

    threshold = choose_threshold(
        splits["val"].labels,
        probs["val"],
        settings.threshold,
        settings.fixed_threshold,
        settings.target_sensitivity,
        settings.youden_tolerance,
    )
    classifier.threshold = threshold
    report: dict = {"threshold": round(threshold, 6)}
    figures, predictions = [], []
    for name, data in splits.items():
        labels, patients = data.labels, data.index["patient_id"]
        report[name] = split_metrics(
            labels, patients, probs[name], threshold, settings, params.seed
        )
        refused = assessed[name].out_of_distribution
        report[name] |= {
            "refused": round(float(refused.mean()), 6),
            "refused_n": int(refused.sum()),
        }
        accepted = ~refused
        report[f"{name}_accepted"] = split_metrics(
            labels[accepted], patients[accepted], probs[name][accepted], threshold, settings,
            params.seed,
        )  # fmt: skip
        figures += save_plot_data(
            args.plots,
            name,
            data.labels,
            probs[name],
            threshold,
            report[name],
            settings.calibration_bins,
        )
        predictions.append(predictions_table(name, data, assessed[name], threshold))

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
            for split, metrics in report.items()
            if isinstance(metrics, dict)
            for k, v in metrics.items()
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
        for key, what in ((name, "all images"), (f"{name}_accepted", "accepted by the guard")):
            m = report[key]
            if not m["n"]:
                print(f"{key:>13}: the guard refused every image")
                continue
            print(
                f"{key:>13}: AUC {m['roc_auc']} [{m.get('roc_auc_ci_low')},"
                f" {m.get('roc_auc_ci_high')}]  accuracy {m['accuracy']}  sensitivity"
                f" {m['sensitivity']}  specificity {m['specificity']}  F1 {m['f1']}"
                f"  ({m['n']} images, {m['patients']} patients, {what})"
            )
        print(f"{'':>13}  the guard refuses {report[name]['refused']:.1%} of {name} images")
    print(f"threshold {threshold:.4f} ({settings.threshold}, chosen on validation)")
    print(f"registered models:/{version.name}@{serving.CANDIDATE} (version {version.version})")


if __name__ == "__main__":
    run(main)
