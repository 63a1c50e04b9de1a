"""The trained network as an ONNX file, and the `Classifier` backend that runs it on
onnxruntime (no PyTorch in the loop).

The graph is `cxr.guard.GuardedNetwork`: uint8 (N, 1, S, S) pixels in, normalized inside the
graph by the same function training uses, one logit and one guard score per image out, with a
dynamic batch. What surrounds it at inference (decoding with the card's resize and intensity,
flip TTA, the validation-fitted temperature, the validation-chosen threshold and the guard's
threshold) travels in the file's metadata and is applied by `Classifier`, as for PyTorch, so
`pneumonia-predict --backend onnx` needs only the .onnx file. The graph's logit is the
network's, before the temperature, so it can be compared with PyTorch's directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import Field

from cxr.classifier import Classifier, read_card
from cxr.params import Section

CARD_KEY, DECISION_KEY = "cxr.card", "cxr.decision"


class ExportParams(Section):
    opset: Annotated[int, Field(ge=18)]  # the oldest opset torch's ONNX exporter targets
    tolerance: Annotated[float, Field(gt=0)]  # largest |ONNX - PyTorch| logit before it fails


def export_onnx(classifier: Classifier, target: Path, opset: int) -> None:
    """Write the network and guard to `target` with the card and decision settings as
    metadata; the classifier must have its guard."""
    model = classifier.pytorch.network().cpu().eval()
    size = classifier.card.image_size
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        input_names=["image"],
        output_names=["logit", "ood_score"],
        opset_version=opset,
        dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
        external_data=False,  # one self-contained file
    )
    proto = onnx.load(str(target))
    decision = {
        "threshold": classifier.threshold,
        "flip_tta": classifier.flip_tta,
        "temperature": classifier.temperature,
        "ood_threshold": classifier.ood_threshold,
    }
    for key, value in ((CARD_KEY, asdict(classifier.card)), (DECISION_KEY, decision)):
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


@dataclass(frozen=True)
class OnnxBackend:
    """The exported graph on onnxruntime, given the uint8 pixels the PyTorch backend takes."""

    session: ort.InferenceSession

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(images, dtype=np.uint8)[:, np.newaxis]
        logit, score = self.session.run(None, {"image": pixels})
        return logit[:, 0], score


def load_onnx(path: Path, threads: int = 0) -> Classifier:
    """The ONNX file as a `Classifier`, with the card and decision settings of its metadata;
    `threads`: onnxruntime's intra-op threads (0: its default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    card = read_card(json.loads(metadata[CARD_KEY]))
    return Classifier.from_settings(OnnxBackend(session), card, json.loads(metadata[DECISION_KEY]))
