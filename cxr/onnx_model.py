"""The trained network as an ONNX file, and inference on it with onnxruntime (no PyTorch).

The graph is the network and its input guard: normalized (N, 1, S, S) float32 in, one logit and
one guard score per image out, with a dynamic batch. What surrounds it at inference (decoding,
the card's resize, intensity and normalization, flip TTA, the validation-fitted temperature,
the validation-chosen threshold and the guard's threshold) travels in the file's metadata, so
`pneumonia-predict --backend onnx` needs only the .onnx file. The graph's logit is the
network's, before the temperature, so it can be compared with PyTorch's directly.
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

from cxr.classifier import Assessment, Classifier, probability_from_logit
from cxr.guard import GuardedNetwork, out_of_distribution
from cxr.images import load_square
from cxr.model import ModelCard

CARD_KEY, DECISION_KEY = "cxr.card", "cxr.decision"


def export_onnx(classifier: Classifier, target: Path, opset: int) -> None:
    """Write the network and guard to `target` with the card and decision settings as
    metadata; the classifier must have its guard."""
    if classifier.guard is None:
        raise ValueError("export needs the model's input guard (models/guard.pt)")
    model = GuardedNetwork(classifier.model, classifier.guard).cpu().eval()
    size = classifier.card.image_size
    example = torch.zeros(2, 1, size, size)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        input_names=["image"],
        output_names=["logit", "ood_score"],
        opset_version=opset,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
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


class OnnxClassifier:
    """`Classifier`'s inference half on onnxruntime: same card, threshold, flip TTA and
    temperature (1.0 in a file exported before calibration existed)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        card = json.loads(metadata[CARD_KEY])
        self.card = ModelCard(**{**card, "class_names": tuple(card["class_names"])})
        decision = json.loads(metadata[DECISION_KEY])
        self.threshold, self.flip_tta = float(decision["threshold"]), bool(decision["flip_tta"])
        self.temperature = float(decision.get("temperature", 1.0))
        self.ood_threshold = float(decision["ood_threshold"])

    def load_image(self, path: Path | IO[bytes]) -> np.ndarray:
        return load_square(path, self.card.image_size, self.card.resize, self.card.intensity)

    def label(self, probability: float) -> str:
        return self.card.class_names[int(probability >= self.threshold)]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W) to one logit and one guard score per image, normalized as the card
        says."""
        x = (images.astype(np.float32) / 255.0 - self.card.mean) / self.card.std
        logit, score = self.session.run(None, {"image": x[:, np.newaxis].astype(np.float32)})
        return logit[:, 0], score

    def assess(self, images: np.ndarray, batch_size: int = 64) -> Assessment:
        """Calibrated pneumonia probability, logit, guard score and verdict per uint8 image."""
        logits, scores = [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size])
            logit, score = self.run(batch)
            if self.flip_tta:
                logit = (logit + self.run(batch[:, :, ::-1])[0]) / 2
            logits.append(logit)
            scores.append(score)
        score, logit = np.concatenate(scores), np.concatenate(logits)
        probability = probability_from_logit(logit, self.temperature)
        return Assessment(probability, score, out_of_distribution(score, self.ood_threshold), logit)

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pneumonia probability per uint8 image."""
        return self.assess(images, batch_size).probability
