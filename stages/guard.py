"""Fit the input guard on the training split and measure it on real and non-X-ray images.

Fitted on the training split's features (each stage's scale from held-out folds of its
patients), its threshold set at guard.quantile of the validation split's scores; nothing here
reads a label or a score of the test split to make a choice. The official test split then says
how many real X-rays the guard would refuse, and the offline out-of-distribution set
(cxr/ood_set.py; its X-ray kinds transform test images drawn from both classes) how well it
separates them from what it should refuse.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from cxr import tracking
from cxr.atomic import write_csv, write_json, write_png
from cxr.classes import CLASSES
from cxr.classifier import Classifier
from cxr.device import use_cpu_threads
from cxr.figures import DPI, PANEL_PX, show_xray
from cxr.guard import GuardParams, fit_guard, out_of_distribution
from cxr.ood_set import ood_images
from cxr.params import Section, Seed, StageParams, load_params
from cxr.processed import load_split
from cxr.sampling import scoring_sample
from cxr.stage import paths, require, run


class DataSource(Section):
    """Of the data section, the guard reads only whether the X-rays are the synthetic demo's
    (the validate stage checks the rest)."""

    model_config = Section.model_config | {"extra": "ignore"}
    source: str


class Params(StageParams):
    seed: Seed
    guard: GuardParams
    data: DataSource


IN_DISTRIBUTION = "test X-ray"


def separation(scores: pd.DataFrame, kind: str | None = None) -> dict:
    """AUROC of test X-rays against one kind (all kinds if None), and the share flagged."""
    real = scores["kind"] == IN_DISTRIBUTION
    other = ~real if kind is None else scores["kind"] == kind
    rows = scores[real | other]
    return {
        "auroc": float(roc_auc_score(rows["kind"] != IN_DISTRIBUTION, rows["score"])),
        "flagged": float(scores.loc[other, "flagged"].mean()),
        "images": int(other.sum()),
    }


def save_guard_figures(
    folder: Path,
    scores: pd.DataFrame,
    threshold: float,
    examples: list[tuple[str, np.ndarray, float]],
) -> None:
    """The guard's scores per kind of image against its threshold, and one image of each kind
    as the network sees it, with its score and verdict."""
    kinds = list(dict.fromkeys(scores["kind"]))
    figure = Figure(figsize=(8, 0.45 * len(kinds) + 1.2), layout="constrained")
    axes = figure.subplots()
    for row, kind in enumerate(kinds):
        values = scores.loc[scores["kind"] == kind, "score"].to_numpy()
        jitter = np.random.default_rng(row).uniform(-0.25, 0.25, len(values))
        axes.scatter(np.maximum(values, 1e-3), row + jitter, s=6, alpha=0.5)
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    axes.set(xscale="log", yticks=range(len(kinds)), yticklabels=kinds, xlabel="guard score")
    axes.invert_yaxis()
    axes.legend(loc="lower right", fontsize=8)
    write_png(folder / "scores.png", figure, DPI)

    side = PANEL_PX / DPI * 0.75
    figure = Figure(figsize=(len(examples) * side, side + 0.5), layout="constrained")
    for axes, (kind, image, score) in zip(
        np.atleast_1d(figure.subplots(1, len(examples))), examples, strict=True
    ):
        verdict = "flagged" if out_of_distribution(np.array([score]), threshold)[0] else "passed"
        show_xray(axes, image, f"{kind}\n{score:.3g}: {verdict}")
    write_png(folder / "examples.png", figure, DPI)


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "model", "processed", "guard", "metrics", "plots", argv=argv)
    params = load_params(Params)
    use_cpu_threads(params.runtime.threads)
    settings = params.guard
    require(args.model, args.processed)
    classifier = Classifier.load(
        args.model, with_guard=False, channels_last=params.runtime.channels_last
    )
    train, val, test = (load_split(split, args.processed) for split in ("train", "val", "test"))

    guard = fit_guard(
        classifier.features(train.images), train.labels, train.index["patient_id"].to_numpy()
    )
    with torch.no_grad():
        val_features = [torch.from_numpy(f) for f in classifier.features(val.images)]
        scaled = guard.scaled_distances(val_features).numpy()
    guard.calibrate(scaled.max(axis=0), settings.quantile)
    classifier.guard = guard  # calibrated: its threshold is the one the verdicts below use
    decided_by = np.bincount(scaled.argmax(axis=0), minlength=guard.stages) / scaled.shape[1]

    test_images = np.asarray(test.images)
    sample = test_images[scoring_sample(test.labels, settings.ood_images, params.seed)]
    generated = ood_images(sample, settings.ood_images, params.seed, params.data.source != "demo")
    decoded = np.stack([classifier.load_image(io.BytesIO(png)) for _, png in generated])
    scores = pd.DataFrame(
        {
            "kind": [IN_DISTRIBUTION] * len(test_images) + [kind for kind, _ in generated],
            "score": classifier.assess(np.concatenate([test_images, decoded])).ood_score,
        }
    )
    scores["flagged"] = out_of_distribution(scores["score"].to_numpy(), classifier.ood_threshold)
    real = scores["kind"] == IN_DISTRIBUTION
    report = {
        "threshold": float(classifier.guard.threshold),
        "quantile": settings.quantile,
        "test_flagged": float(scores.loc[real, "flagged"].mean()),
        "test_images": int(real.sum()),
        # ~1 for every stage when the scales hold for unseen X-rays, so that each can decide
        "val_stage_median": {
            f"stage{i}": round(float(m), 4) for i, m in enumerate(np.median(scaled, axis=1))
        },
        "val_decided_by": {
            f"stage{i}": round(float(share), 4) for i, share in enumerate(decided_by)
        },
        "ood": separation(scores),
        "by_kind": {kind: separation(scores, kind) for kind in scores.loc[~real, "kind"].unique()},
    }
    classifier.guard.save(args.guard)
    write_json(args.metrics, report)
    write_csv(args.plots / "scores.csv", scores)
    pictures = np.concatenate([test_images, decoded])
    shown = {f"test {CLASSES[c]}": int(np.flatnonzero(test.labels == c)[0]) for c in (0, 1)}
    shown |= {kind: int(np.flatnonzero(scores["kind"] == kind)[0]) for kind in report["by_kind"]}
    save_guard_figures(
        args.plots,
        scores,
        report["threshold"],
        [(title, pictures[i], scores["score"][i]) for title, i in shown.items()],
    )
    with tracking.start_stage_run(
        params.mlflow.experiment, params.mlflow.tracking_uri, classifier.card.mlflow_run_id, "guard"
    ):
        mlflow.log_metrics(
            {
                "guard_test_flagged": report["test_flagged"],
                "guard_ood_auroc": report["ood"]["auroc"],
                "guard_ood_flagged": report["ood"]["flagged"],
            }
        )
        mlflow.log_params({"guard.quantile": settings.quantile})
    print(
        f"{args.guard}: threshold {report['threshold']:.3g} ({settings.quantile:.0%} of "
        f"validation) flags {report['test_flagged']:.1%} of {report['test_images']} test X-rays "
        f"and {report['ood']['flagged']:.1%} of {report['ood']['images']} other images "
        f"(AUROC {report['ood']['auroc']:.4f})"
    )
    for kind, figures in report["by_kind"].items():
        print(f"  {kind:10s} AUROC {figures['auroc']:.4f}, flagged {figures['flagged']:.0%}")


if __name__ == "__main__":
    run(main)
