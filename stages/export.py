"""Export the trained model to ONNX, checked against PyTorch on the test split.

The check runs on the file before it replaces models/model.onnx, so a failed or interrupted
export never leaves a file that looks usable; the largest logit difference, the share of test
images given the same class, the opset and the library versions go to metrics/export.json.
"""

from __future__ import annotations

from importlib.metadata import version

import mlflow
import numpy as np
import torch

from cxr import tracking
from cxr.atomic import atomic_path, write_json
from cxr.model import Classifier
from cxr.onnx_model import OnnxClassifier, export_onnx
from cxr.params import load_params
from cxr.processed import load_split
from cxr.stage import StageError, paths, require, run


@torch.no_grad()
def torch_logits(classifier: Classifier, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The network's raw logits, without flip TTA: what the exported graph computes."""
    starts = range(0, len(images), batch_size)
    logits = [classifier.model(classifier.to_tensor(images[i : i + batch_size])) for i in starts]
    return torch.cat(logits)[:, 0].numpy()


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "model", "threshold", "processed", "onnx", "metrics", argv=argv)
    params = load_params()
    settings = params.export
    require(args.model, args.threshold, args.processed)
    classifier = Classifier.load(args.model, threshold_file=args.threshold)
    images = np.asarray(load_split("test", args.processed).images)

    with atomic_path(args.onnx) as tmp:
        export_onnx(classifier, tmp, settings.opset)
        exported = OnnxClassifier(tmp)
        difference = float(np.abs(exported.logits(images) - torch_logits(classifier, images)).max())
        same_class = float(
            np.mean(
                (exported.predict_proba(images) >= exported.threshold)
                == (classifier.predict_proba(images) >= classifier.threshold)
            )
        )
        if difference > settings.tolerance:
            raise StageError(
                f"{args.onnx}: ONNX and PyTorch logits differ by up to {difference:.2e} on the "
                f"test split, more than export.tolerance ({settings.tolerance:.0e})"
            )
    report = {
        "max_abs_logit_difference": difference,
        "same_class": same_class,
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
            {"onnx_max_abs_logit_difference": difference, "onnx_same_class": same_class}
        )
        mlflow.log_params({"onnx.opset": settings.opset, "onnxruntime": report["onnxruntime"]})
    print(
        f"{args.onnx}: opset {settings.opset}, {len(images)} test images, max |logit difference| "
        f"{difference:.2e}, same class {same_class:.1%}"
    )


if __name__ == "__main__":
    run(main)
