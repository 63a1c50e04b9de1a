"""Export the trained model to ONNX, checked against PyTorch on the test split.

The check runs on the file before it replaces models/model.onnx, so a failed or interrupted
export never leaves a file that looks usable; the largest logit, probability and guard-score
differences, the shares of test images given the same class and the same guard verdict, the
temperature, the opset and the library versions go to metrics/export.json.

Logits are compared as the graph computes them, before flip TTA and the temperature; the
probabilities are compared as each deployed form reports them, after both, since a temperature
below 1/4 magnifies a logit difference in the probability (sigmoid's slope is at most 1/4).
"""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import version

import mlflow
import numpy as np
import torch

from cxr import tracking
from cxr.atomic import atomic_path, write_json
from cxr.classifier import Classifier
from cxr.device import use_cpu_threads
from cxr.onnx_model import ExportParams, export_onnx, load_onnx
from cxr.params import StageParams, load_params
from cxr.processed import load_split
from cxr.stage import StageError, paths, require, run


class Params(StageParams):
    export: ExportParams


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "model", "threshold", "guard", "processed", "onnx", "metrics", argv=argv)
    params = load_params(Params)
    use_cpu_threads(params.runtime.threads)
    settings = params.export
    require(args.model, args.threshold, args.guard, args.processed)
    classifier = Classifier.load(
        args.model,
        threshold_file=args.threshold,
        guard_file=args.guard,
        channels_last=params.runtime.channels_last,
    )
    images = np.asarray(load_split("test", args.processed).images)

    with atomic_path(args.onnx) as tmp:
        export_onnx(classifier, tmp, settings.opset)
        onnx_model = load_onnx(tmp)
        exported, reference = onnx_model.assess(images), classifier.assess(images)
        # what the graph computes: each backend's logits and guard scores, without flip TTA
        onnx_raw, torch_raw = (exported, reference)
        if classifier.flip_tta:
            onnx_raw, torch_raw = (
                replace(model, flip_tta=False).assess(images) for model in (onnx_model, classifier)
            )
        difference = float(np.abs(onnx_raw.logit - torch_raw.logit).max())
        probability_difference = float(np.abs(exported.probability - reference.probability).max())
        # guard scores run from about 1 to thousands: compared relative to their size
        torch_scores = torch_raw.ood_score
        score_difference = float(
            (np.abs(onnx_raw.ood_score - torch_scores) / np.maximum(np.abs(torch_scores), 1)).max()
        )
        same_class = float(
            np.mean(
                (exported.probability >= classifier.threshold)
                == (reference.probability >= classifier.threshold)
            )
        )
        same_verdict = float(np.mean(exported.out_of_distribution == reference.out_of_distribution))
        checks = (
            ("logits", difference),
            ("probabilities", probability_difference),
            ("guard scores", score_difference),
        )
        for name, value in checks:
            if value > settings.tolerance:
                raise StageError(
                    f"{args.onnx}: ONNX and PyTorch {name} differ by up to {value:.2e} on the "
                    f"test split, more than export.tolerance ({settings.tolerance:.0e})"
                )
    report = {
        "max_abs_logit_difference": difference,
        "max_abs_probability_difference": probability_difference,
        "max_rel_guard_score_difference": score_difference,
        "temperature": onnx_model.temperature,
        "same_class": same_class,
        "same_guard_verdict": same_verdict,
        "images_checked": len(images),
        "opset": settings.opset,
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
    }
    write_json(args.metrics, report)
    with tracking.start_stage_run(
        params.mlflow.experiment,
        params.mlflow.tracking_uri,
        classifier.card.mlflow_run_id,
        "export",
    ):
        mlflow.log_metrics(
            {
                "onnx_max_abs_logit_difference": difference,
                "onnx_max_abs_probability_difference": probability_difference,
                "onnx_same_class": same_class,
                "onnx_same_guard_verdict": same_verdict,
            }
        )
        mlflow.log_params({"onnx.opset": settings.opset, "onnxruntime": report["onnxruntime"]})
    print(
        f"{args.onnx}: opset {settings.opset}, {len(images)} test images, max |logit difference| "
        f"{difference:.2e}, |probability difference| {probability_difference:.2e} (temperature "
        f"{onnx_model.temperature:.3f}), same class {same_class:.1%}; guard scores within "
        f"{score_difference:.1e} (relative), same verdict {same_verdict:.1%}"
    )


if __name__ == "__main__":
    run(main)
