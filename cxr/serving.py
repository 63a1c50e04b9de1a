"""The deployable model: an MLflow pyfunc that takes encoded X-ray files and returns decisions.

The bare network logged by the train stage expects a normalized (N, 1, H, W) tensor, which no
caller has. This wrapper holds everything between a file and a decision, from the same code
`pneumonia-predict` runs: decoding (any JPEG/PNG mode, EXIF orientation), the model card's
resize, intensity and normalization, the network, flip TTA when it was chosen, and the
threshold chosen on validation, and the input guard: an image unlike the training X-rays gets
`in_distribution` false, a `warning` and no label. Its artifacts are the weights file,
threshold.json and guard.pt, not a pickled training object, so it loads wherever this
package's `cxr` code and its pinned libraries do.

Over `mlflow models serve`, the `image` column holds base64 text in JSON (the signature declares
it binary, so MLflow's server decodes it); one unreadable image, or one over the pixel limit
(`cxr.images.MAX_PIXELS`, refused from its header before it is decoded), gets an `error` in its
own row and the rest of the batch is still answered.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from cxr.classifier import Classifier, decide
from cxr.images import ImageDecodeError

IMAGE_COLUMN = "image"
CANDIDATE = "candidate"  # the alias each evaluated version gets; "champion" is set by a person
# What the cxr code a served model imports needs, pinned to this environment's versions.
REQUIREMENTS = (
    "torch", "timm", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "mlflow", "scikit-learn"
)  # fmt: skip
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("double", "probability"),
            ColSpec("string", "label"),
            ColSpec("double", "threshold"),
            ColSpec("double", "ood_score", required=False),
            ColSpec("double", "ood_threshold", required=False),
            ColSpec("boolean", "in_distribution", required=False),
            ColSpec("string", "warning", required=False),
            ColSpec("string", "error", required=False),
        ]
    ),
)


def classify_files(classifier: Classifier, files: list[bytes]) -> pd.DataFrame:
    """One row per encoded file: the decision's fields, or the reason the file failed."""
    columns = [column.name for column in SIGNATURE.outputs.inputs]
    rows: dict[int, dict] = {}
    arrays: dict[int, np.ndarray] = {}
    for i, blob in enumerate(files):
        buffer = io.BytesIO(blob)
        buffer.name = f"image {i}"  # what a decoding error quotes
        try:
            arrays[i] = classifier.load_image(buffer)
        except ImageDecodeError as err:
            rows[i] = dict.fromkeys(columns) | {
                "threshold": classifier.threshold,
                "error": str(err),
            }
    if arrays:
        decisions = decide(classifier, np.stack(list(arrays.values())))
        for i, decision in zip(arrays, decisions, strict=True):
            rows[i] = {**asdict(decision), "error": None}
    # object columns keep None as None, which JSON writes as null (a float column would hold
    # NaN, which is not JSON)
    return pd.DataFrame([rows[i] for i in range(len(files))], columns=columns, dtype=object)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 grayscale array as PNG bytes (the logged input example)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def register(
    model_file: Path,
    threshold_file: Path,
    guard_file: Path,
    registered_name: str,
    example: bytes,
    description: str,
    tags: dict[str, str],
) -> ModelVersion:
    """Log the pyfunc into the active run, register it as a new version of `registered_name`
    and point the `candidate` alias at it; `champion` is left to a person (docs/deploy.md).

    Requirements are pinned from this environment instead of inferred, which would load the
    model once more in a subprocess on every evaluation.
    """
    info = mlflow.pyfunc.log_model(
        name="xray_classifier",
        python_model=str(Path(__file__).with_name("served_model.py")),
        artifacts={
            "model": str(model_file),
            "threshold": str(threshold_file),
            "guard": str(guard_file),
        },
        code_paths=[str(Path(__file__).parent)],
        signature=SIGNATURE,
        input_example=pd.DataFrame({IMAGE_COLUMN: [example]}),
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        registered_model_name=registered_name,
    )
    client = mlflow.MlflowClient()
    model_version = client.get_model_version(registered_name, str(info.registered_model_version))
    for key, value in tags.items():
        if value:
            client.set_model_version_tag(registered_name, model_version.version, key, value)
    client.update_model_version(registered_name, model_version.version, description)
    client.set_registered_model_alias(registered_name, CANDIDATE, model_version.version)
    return model_version


def describe(classifier: Classifier, report: dict, strategy: str) -> str:
    """The registered version's description: a small model card with the test figures."""
    card, test = classifier.card, report["test"]
    tta = ", flip TTA" if classifier.flip_tta else ""

    def figure(name: str) -> str:
        value, low, high = test[name], test.get(f"{name}_ci_low"), test.get(f"{name}_ci_high")
        if value is None:
            return f"{name} n/a"
        return f"{name} {value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    return (
        f"{card.arch}, {card.image_size} px ({card.resize}, intensity {card.intensity}); "
        f"threshold {classifier.threshold:.4f} chosen on validation ({strategy}{tta}).\n"
        f"Official test set, {test['n']} images from {test['patients']} patients, 95% intervals "
        f"resampling patients: {figure('roc_auc')}, {figure('accuracy')}, "
        f"{figure('sensitivity')}, {figure('specificity')}; the input guard refuses "
        f"{test['refused']:.1%} of them ({test['refused_n']}).\n"
        f"Input: encoded JPEG/PNG files (column `{IMAGE_COLUMN}`, base64 in JSON); output per "
        "image: probability of PNEUMONIA, label, threshold, the input guard's score, threshold "
        "and verdict (in_distribution; a flagged image gets a warning and no label), error."
    )


class XrayClassifier(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(...).predict(DataFrame({"image": [bytes, ...]}))`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.classifier = Classifier.load(
            Path(context.artifacts["model"]),
            threshold_file=Path(context.artifacts["threshold"]),
            guard_file=Path(context.artifacts["guard"]),
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict | None = None,
    ) -> pd.DataFrame:
        return classify_files(self.classifier, list(model_input[IMAGE_COLUMN]))
