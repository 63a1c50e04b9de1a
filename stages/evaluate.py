"""Score the trained model on validation and the official test set.

The temperature that calibrates the probabilities (`evaluate.calibration`) and then the decision
threshold, on those calibrated probabilities, are chosen on validation only (all its images) and
applied unchanged to test; both are stored beside the model (models/threshold.json), so every
deployed form reports the probability the threshold and the metrics were computed on. Each
split's metrics are those of the calibrated probabilities, with log loss, Brier and ECE before
calibration (`*_uncalibrated`) beside them. Intervals resample patients, not images (see
`bootstrap_intervals`).

A temperature fitted on validation fixes the network's over- or under-confidence there; it
cannot fix a test population that differs from validation, so test ECE after calibration is the
honest measure of what it achieved.

The deployed model diagnoses only what its input guard lets through, so each split is reported
twice: over all images (`test`), as a bare network would be judged, and over the images the
guard accepts (`test_accepted`), with the share it refuses (`test.refused`) beside them.

`test_notebook_protocol` is the same model under the older projects' protocol: the threshold of
best test accuracy, picked on the test set. It is a labelled comparison row, never a choice.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from cxr import serving, tracking
from cxr.atomic import write_csv, write_json
from cxr.classes import CLASSES
from cxr.classifier import Assessment, Classifier, probability_from_logit
from cxr.device import pick_device, use_cpu_threads
from cxr.evaluation import (
    TEMPERATURE_BOUNDS,
    EvaluateParams,
    calibration_table,
    choose_threshold,
    curve_tables,
    fit_temperature,
    notebook_protocol,
    split_metrics,
)
from cxr.metric_figures import save_figures
from cxr.params import Seed, StageParams, load_params
from cxr.processed import ProcessedSplit, load_split
from cxr.stage import paths, require, run


class Params(StageParams):
    seed: Seed
    evaluate: EvaluateParams


def save_plot_data(
    folder: Path,
    split: str,
    labels: np.ndarray,
    probs: np.ndarray,
    uncalibrated: np.ndarray,
    threshold: float,
    metrics: dict,
    bins: int,
) -> list[Path]:
    """Curve tables for `dvc plots`, and the same curves as PNGs for MLflow and reports.

    `{split}_calibration_uncalibrated.csv` is the reliability table before temperature scaling,
    written even without calibration (then equal to `{split}_calibration.csv`) so that the
    plot dvc.yaml defines over both files always finds them."""
    tables = curve_tables(labels, probs, threshold, bins)
    before = calibration_table(labels, uncalibrated, bins)
    for kind, table in (*tables.items(), ("calibration_uncalibrated", before)):
        write_csv(folder / f"{split}_{kind}.csv", table)
    return save_figures(
        folder / "figures", split, tables, metrics, probs, threshold, bins, uncalibrated=before
    )


def predictions_table(
    split: str, data: ProcessedSplit, probs: np.ndarray, assessment: Assessment, threshold: float
) -> pd.DataFrame:
    """One row per image with the calibrated probability the deployed model reports."""
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
    params = load_params(Params)
    use_cpu_threads(params.runtime.threads)
    settings = params.evaluate
    require(args.model, args.guard, args.processed)
    device = str(pick_device(params.runtime.device))
    classifier = Classifier.load(
        args.model,
        device=device,
        guard_file=args.guard,
        with_threshold=False,
        channels_last=params.runtime.channels_last,
    )
    # The temperature and threshold are chosen below, on logits computed with this setting.
    classifier.flip_tta = settings.flip_tta
    splits = {name: load_split(name, args.processed) for name in ("val", "test")}
    assessed = {name: classifier.assess(np.asarray(s.images)) for name, s in splits.items()}
    logits = {name: a.logit for name, a in assessed.items()}
    temperature = 1.0
    if settings.calibration == "temperature":
        temperature = fit_temperature(splits["val"].labels, logits["val"])
    uncalibrated = {name: probability_from_logit(z, 1.0) for name, z in logits.items()}
    probs = {name: probability_from_logit(z, temperature) for name, z in logits.items()}
    classifier.temperature = temperature

    threshold = choose_threshold(
        splits["val"].labels,
        probs["val"],
        settings.threshold,
        settings.fixed_threshold,
        settings.target_sensitivity,
        settings.youden_tolerance,
    )
    classifier.threshold = threshold
    report: dict = {"threshold": round(threshold, 6), "temperature": round(temperature, 6)}
    figures, predictions = [], []
    for name, data in splits.items():
        labels, patients = data.labels, data.index["patient_id"]
        report[name] = split_metrics(
            labels, patients, probs[name], uncalibrated[name], threshold, settings, params.seed
        )
        refused = assessed[name].out_of_distribution
        report[name] |= {
            "refused": round(float(refused.mean()), 6),
            "refused_n": int(refused.sum()),
        }
        accepted = ~refused
        report[f"{name}_accepted"] = split_metrics(
            labels[accepted], patients[accepted], probs[name][accepted],
            uncalibrated[name][accepted], threshold, settings, params.seed,
        )  # fmt: skip
        figures += save_plot_data(
            args.plots,
            name,
            data.labels,
            probs[name],
            uncalibrated[name],
            threshold,
            report[name],
            settings.calibration_bins,
        )
        predictions.append(predictions_table(name, data, probs[name], assessed[name], threshold))

    report["test_notebook_protocol"] = notebook_protocol(
        splits["test"].labels, probs["test"], settings.calibration_bins
    )

    write_json(args.metrics, report)
    write_json(
        args.threshold,
        {
            "threshold": threshold,
            "strategy": settings.threshold,
            "flip_tta": settings.flip_tta,
            "temperature": temperature,
            "calibration": settings.calibration,
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
        mlflow.set_tag("evaluate.calibration", settings.calibration)
        flat = {
            f"{split}_{k}": v
            for split, metrics in report.items()
            if isinstance(metrics, dict)
            for k, v in metrics.items()
            if isinstance(v, (int, float))
        }
        mlflow.log_metrics({"threshold": threshold, "temperature": temperature, **flat})
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        # The deployable model, registered once its threshold is known (docs/deploy.md).
        version = serving.register(
            args.model,
            args.threshold,
            args.guard,
            params.mlflow.registered_model,
            serving.encode_png(np.asarray(splits["val"].images[0])),
            serving.describe(classifier, report, settings.threshold),
            {
                **tracking.run_tags(),
                "training_run_id": classifier.card.mlflow_run_id,
                "pretrained.source": classifier.card.pretrained,
                "pretrained.sha256": classifier.card.pretrained_sha256,
            },
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
            print(
                f"{'':>13}  ECE {m['ece_uncalibrated']} -> {m['ece']}, log loss"
                f" {m['log_loss_uncalibrated']} -> {m['log_loss']}, specificity at 95%"
                f" sensitivity {m['specificity_at_95_sensitivity']}"
            )
        print(f"{'':>13}  the guard refuses {report[name]['refused']:.1%} of {name} images")
    m = report["test_notebook_protocol"]
    print(
        f"test, threshold {m['threshold_picked_on_test']:.4f} picked on test (the older projects'"
        f" protocol, for comparison only): accuracy {m['accuracy']}  sensitivity"
        f" {m['sensitivity']}  specificity {m['specificity']}"
    )
    print(
        f"temperature {temperature:.4f} ({settings.calibration}), threshold {threshold:.4f}"
        f" ({settings.threshold}), both chosen on validation"
    )
    if any(np.isclose(temperature, bound, rtol=1e-3) for bound in TEMPERATURE_BOUNDS):
        print(
            f"warning: the temperature stopped at its bound {temperature:.3g}: the validation"
            " logits are separated perfectly (low) or carry almost no signal (high)"
        )
    print(f"registered models:/{version.name}@{serving.CANDIDATE} (version {version.version})")


if __name__ == "__main__":
    run(main)
