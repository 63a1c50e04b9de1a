"""The trained network as an ONNX file, and inference on it with onnxruntime (no PyTorch).

The graph is the network alone: normalized (N, 1, S, S) float32 in, one logit per image out,
with a dynamic batch. What surrounds it at inference (decoding, the card's resize, intensity
and normalization, flip TTA, the validation-chosen threshold) travels in the file's metadata,
so `pneumonia-predict --backend onnx` needs only the .onnx file.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import IO

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cxr.images import load_square
from cxr.model import Classifier, ModelCard

CARD_KEY, DECISION_KEY = "cxr.card", "cxr.decision"


def export_onnx(classifier: Classifier, target: Path, opset: int) -> None:
    """Write the network to `target` with the card and decision settings as metadata."""
    model = classifier.model.cpu().eval()
    size = classifier.card.image_size
    example = torch.zeros(2, 1, size, size)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        input_names=["image"],
        output_names=["logit"],
        opset_version=opset,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        external_data=False,  # one self-contained file
    )
    proto = onnx.load(str(target))
    decision = {"threshold": classifier.threshold, "flip_tta": classifier.flip_tta}
    for key, value in ((CARD_KEY, asdict(classifier.card)), (DECISION_KEY, decision)):
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


class OnnxClassifier:
    """`Classifier`'s inference half on onnxruntime: same card, threshold and flip TTA."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        card = json.loads(metadata[CARD_KEY])
        self.card = ModelCard(**{**card, "class_names": tuple(card["class_names"])})
        decision = json.loads(metadata[DECISION_KEY])
        self.threshold, self.flip_tta = float(decision["threshold"]), bool(decision["flip_tta"])

    def load_image(self, path: Path | IO[bytes]) -> np.ndarray:
        return load_square(path, self.card.image_size, self.card.resize, self.card.intensity)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) to one logit per image, normalized exactly as the card says."""
        x = (images.astype(np.float32) / 255.0 - self.card.mean) / self.card.std
        (logit,) = self.session.run(None, {"image": x[:, np.newaxis].astype(np.float32)})
        return logit[:, 0]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pneumonia probability per uint8 image."""
        logits = []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size])
            logit = self.logits(batch)
            if self.flip_tta:
                logit = (logit + self.logits(batch[:, :, ::-1])) / 2
            logits.append(logit)
        return 1 / (1 + np.exp(-np.concatenate(logits)))
