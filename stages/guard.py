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

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cxr import tracking
from cxr.atomic import write_csv, write_json
from cxr.classifier import Classifier
from cxr.dataset import CLASSES
from cxr.device import use_cpu_threads
from cxr.explain import scoring_sample
from cxr.figures import save_guard_figures
from cxr.guard import fit_guard, out_of_distribution
from cxr.ood_set import ood_images
from cxr.params import load_params
from cxr.processed import load_split
from cxr.stage import paths, require, run

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


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "model", "processed", "guard", "metrics", "plots", argv=argv)
    params = load_params()
    use_cpu_threads(params.runtime.threads)
    settings = params.guard
    require(args.model, args.processed)
    classifier = Classifier.load(args.model, with_guard=False)
    train, val, test = (load_split(split, args.processed) for split in ("train", "val", "test"))

    classifier.guard = fit_guard(
        classifier.features(train.images), train.labels, train.index["patient_id"].to_numpy()
    )
    guard = classifier.guard
    with torch.no_grad():
        val_features = [torch.from_numpy(f) for f in classifier.features(val.images)]
        scaled = guard.scaled_distances(val_features).numpy()
    guard.calibrate(scaled.max(axis=0), settings.quantile)
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
