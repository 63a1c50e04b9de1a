"""Fit the input guard on the training split and measure it on real and non-X-ray images.

Fitted on the training split's features, its threshold set at guard.quantile of the validation
split's scores; nothing here reads a label or a score of the test split to make a choice. The
official test split then says how many real X-rays the guard would refuse, and the offline
out-of-distribution set (cxr/ood_set.py; its X-ray kinds transform test images drawn from
both classes) how well it separates them from what it should refuse.
"""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr import tracking
from cxr.atomic import write_csv, write_json
from cxr.classifier import Classifier
from cxr.dataset import CLASSES
from cxr.device import use_cpu_threads
from cxr.explain import scoring_sample
from cxr.figures import save_guard_figures
from cxr.guard import fit_guard
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

    classifier.guard = fit_guard(classifier.features(train.images), train.labels)
    classifier.guard.calibrate(classifier.assess(val.images).ood_score, settings.quantile)

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
    scores["flagged"] = scores["score"] > float(classifier.guard.threshold)
    real = scores["kind"] == IN_DISTRIBUTION
    report = {
        "threshold": float(classifier.guard.threshold),
        "quantile": settings.quantile,
        "test_flagged": float(scores.loc[real, "flagged"].mean()),
        "test_images": int(real.sum()),
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
