"""Score the members and their ensemble side by side, and write the teacher train learns from.

Each member's logits (stages/member.py) are calibrated by a temperature fitted on validation
log loss (`evaluate.calibration`), and the ensemble is the mean of the members' calibrated
probabilities: a deep ensemble, the best-documented remedy for a shifted population (Ovadia et
al. 2019). Every model's threshold is chosen on validation by `evaluate.threshold`, as the
evaluate stage chooses the deployed model's. Validation figures (ROC-AUC, log loss, Brier, ECE,
specificity at 95% sensitivity) are the ones to rank by; test figures, with intervals over
patients, and the older projects' protocol (`test_notebook_protocol`) are reported only, and
nothing here chooses by them.

The teacher (`distill.teacher`) is the ensemble, or (`best`) whichever of the members and the
ensemble has the lowest validation log loss: a weak member can drag a mean below its best
member, and validation decides. data/teacher.csv holds the teacher's calibrated logit for every
training image, in the training split's order. With `distill.teacher: none` it holds no rows,
so train does not re-run when a member changes.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from cxr import tracking
from cxr.atomic import write_csv, write_json, write_png
from cxr.classes import CLASSES
from cxr.distill import DistillParams
from cxr.evaluation import (
    EvaluateParams,
    choose_threshold,
    fit_temperature,
    notebook_protocol,
    split_metrics,
)
from cxr.members import Members
from cxr.params import Seed, StageParams, load_params
from cxr.processed import SPLITS
from cxr.stage import StageError, paths, require, run

ENSEMBLE = "ensemble"
RANKING = ("roc_auc", "log_loss", "brier", "ece", "specificity_at_95_sensitivity")
REPORTED = ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "accuracy", "sensitivity",
            "specificity", "f1", "ece", "ece_uncalibrated", "log_loss")  # fmt: skip


class Params(StageParams):
    seed: Seed
    members: Members
    distill: DistillParams
    evaluate: EvaluateParams


def read_logits(path: Path, index: pd.DataFrame) -> np.ndarray:
    """A member's logits, checked to score index.csv's images in its order."""
    require(path)
    table = pd.read_csv(path, keep_default_na=False)
    columns = ["split", "row", "path"]
    if not table[columns].equals(index[columns]):
        raise StageError(
            f"{path} scores other images than data/processed/index.csv; run `dvc repro` to "
            "train and score the member again"
        )
    return table["logit"].to_numpy(float)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def report(
    probs: np.ndarray,
    uncalibrated: np.ndarray,
    index: pd.DataFrame,
    settings: EvaluateParams,
    seed: int,
) -> dict:
    """One model's validation ranking figures and its test figures at the threshold chosen on
    validation."""
    labels = (index["label"] == CLASSES[1]).to_numpy(int)
    val, test = (index["split"] == "val").to_numpy(), (index["split"] == "test").to_numpy()
    threshold = choose_threshold(
        labels[val], probs[val], settings.threshold, settings.fixed_threshold,
        settings.target_sensitivity, settings.youden_tolerance,
    )  # fmt: skip
    result: dict = {"threshold": round(threshold, 6)}
    for split, rows, keys in (("val", val, RANKING), ("test", test, REPORTED)):
        metrics = split_metrics(
            labels[rows], index["patient_id"][rows], probs[rows], uncalibrated[rows], threshold,
            settings, seed,
        )  # fmt: skip
        result[split] = {key: metrics[key] for key in keys}
    result["test_notebook_protocol"] = notebook_protocol(
        labels[test], probs[test], settings.calibration_bins
    )
    return result


def save_roc_figure(path: Path, index: pd.DataFrame, probs: dict[str, np.ndarray]) -> None:
    """Every member's and the ensemble's ROC curve, validation beside test: how much each
    loses on the shifted test population, and whether the ensemble holds up better."""
    labels = (index["label"] == CLASSES[1]).to_numpy(int)
    figure = Figure(figsize=(10, 4.5), layout="tight")
    for ax, split in zip(figure.subplots(1, 2), ("val", "test"), strict=True):
        rows = (index["split"] == split).to_numpy()
        for name, p in probs.items():
            fpr, tpr, _ = roc_curve(labels[rows], p[rows])
            ax.plot(fpr, tpr, lw=2.5 if name == ENSEMBLE else 1.2, label=name)
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {split}")
        ax.legend(loc="lower right", fontsize="small")
    write_png(path, figure, dpi=100)


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "scores", "index", "teacher", "metrics", "plots", argv=argv)
    params = load_params(Params)
    settings = params.evaluate
    require(args.index)
    index = pd.read_csv(args.index, keep_default_na=False)
    # The members' order: split by split, each by array row.
    index = index.sort_values(
        ["split", "row"], key=lambda c: c.map(SPLITS.index) if c.name == "split" else c
    ).reset_index(drop=True)
    labels = (index["label"] == CLASSES[1]).to_numpy(int)
    val = (index["split"] == "val").to_numpy()

    calibrated, raw, temperatures = {}, {}, {}
    for name in params.members:
        logits = read_logits(args.scores / f"{name}.csv", index)
        temperature = 1.0
        if settings.calibration == "temperature":
            temperature = fit_temperature(labels[val], logits[val])
        temperatures[name] = temperature
        calibrated[name], raw[name] = sigmoid(logits / temperature), sigmoid(logits)
    calibrated[ENSEMBLE] = np.mean([calibrated[name] for name in params.members], axis=0)
    raw[ENSEMBLE] = np.mean([raw[name] for name in params.members], axis=0)

    results = {
        name: report(calibrated[name], raw[name], index, settings, params.seed)
        | ({"temperature": round(temperatures[name], 6)} if name in temperatures else {})
        for name in calibrated
    }
    best = min(results, key=lambda name: results[name]["val"]["log_loss"])
    teacher = {"none": None, "ensemble": ENSEMBLE, "best": best}[params.distill.teacher]
    train = (index["split"] == "train").to_numpy()
    table = pd.DataFrame({"path": index["path"][train], "logit": np.nan})
    if teacher is None:
        table = table.iloc[:0]
    else:
        p = np.clip(calibrated[teacher][train], 1e-6, 1 - 1e-6)
        table["logit"] = np.log(p / (1 - p)).round(6)
    write_csv(args.teacher, table)
    summary = {"teacher": teacher or "none", "best_by_val_log_loss": best}
    write_json(args.metrics, summary | results)
    save_roc_figure(args.plots / "roc.png", index, calibrated)

    with mlflow.start_run(
        experiment_id=tracking.use_experiment(params.mlflow.experiment, params.mlflow.tracking_uri),
        run_name="ensemble",
        tags={**tracking.run_tags(), "dvc.stage": "ensemble", "teacher": teacher or "none"},
    ):
        mlflow.log_metrics(
            {f"{name}.{split}_{key}": value
             for name, result in results.items()
             for split in ("val", "test")
             for key, value in result[split].items() if value is not None}
        )  # fmt: skip
        mlflow.log_artifact(str(args.plots / "roc.png"), artifact_path="plots")

    print(f"{'':>16} {'validation (ranks)':>44} | test (reported; threshold from validation)")
    print(
        f"{'model':>16} {'AUC':>7} {'logloss':>7} {'Brier':>7} {'ECE':>7} {'sp@95':>7} | "
        f"{'AUC':>6} {'95% CI':>15} {'acc':>6} {'sens':>6} {'spec':>6} {'ECE':>6}"
    )
    for name, result in results.items():
        v, t = result["val"], result["test"]
        print(
            f"{name:>16} {v['roc_auc']:7.4f} {v['log_loss']:7.4f} {v['brier']:7.4f} "
            f"{v['ece']:7.4f} {v['specificity_at_95_sensitivity']:7.4f} | {t['roc_auc']:6.3f} "
            f"[{t['roc_auc_ci_low']:.3f}, {t['roc_auc_ci_high']:.3f}] {t['accuracy']:6.3f} "
            f"{t['sensitivity']:6.3f} {t['specificity']:6.3f} {t['ece']:6.3f}"
        )
    print(
        f"lowest validation log loss: {best}; teacher: {teacher or 'none'} -> "
        f"{args.teacher} ({len(table)} training images)"
    )


if __name__ == "__main__":
    run(main)
