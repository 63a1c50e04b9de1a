"""A trained model in use: its network, card, decision settings and input guard, loaded
together from models/ to turn uint8 X-rays into probabilities and guard verdicts.

Kept apart from `cxr.model`, which the train stage imports, so that a change here (or in the
guard) never makes DVC retrain the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np
import torch
from torch import nn

from cxr.guard import Guard, forward_with_features, out_of_distribution
from cxr.images import load_square
from cxr.model import ModelCard, create_model, normalize

# Stored beside the model by the evaluate stage, which picks the threshold, the temperature and
# whether to average over a horizontal flip on validation data, and by the guard stage.
THRESHOLD_FILE = "threshold.json"
GUARD_FILE = "guard.pt"


def probability_from_logit(logit: np.ndarray, temperature: float) -> np.ndarray:
    """P(PNEUMONIA) from the network's logit (after flip TTA) and the validation-fitted
    temperature: sigmoid(logit / T), in the logit's precision.

    The one place a logit becomes a probability, for PyTorch, ONNX and the evaluate stage
    alike, so the probability a clinician reads is the one the threshold and the reported
    calibration were computed on. torch's sigmoid neither overflows nor warns for large |z|,
    and with T = 1 it gives what the network's output through `torch.sigmoid` gives.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    z = torch.as_tensor(np.asarray(logit)) / temperature
    return torch.sigmoid(z).numpy()


@dataclass(frozen=True)
class Assessment:
    """What a model says of a batch of images: pneumonia probability and, with a guard, how far
    each image lies from the training X-rays and whether that is too far to diagnose it.

    `logit` is the network's output before the temperature (after flip TTA), kept so the
    evaluate stage can fit the temperature on the same pass that scores the images.
    """

    probability: np.ndarray
    ood_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None
    logit: np.ndarray | None = None


@dataclass
class Classifier:
    """A loaded model with its card, the decision settings chosen on validation and the input
    guard, when the pipeline has fitted one.

    `flip_tta` averages the logits of each image and its mirror image; `temperature` divides
    that logit before the sigmoid (1.0: none). The threshold was chosen on probabilities
    computed the same way, so the three travel together in threshold.json.
    """

    model: nn.Module
    card: ModelCard
    threshold: float
    flip_tta: bool = False
    guard: Guard | None = None
    temperature: float = 1.0

    @classmethod
    def load(
        cls,
        path: Path,
        device: str = "cpu",
        threshold_file: Path | None = None,
        guard_file: Path | None = None,
        with_guard: bool = True,
        with_threshold: bool = True,
    ) -> Classifier:
        """The model file, and the decision settings and guard stored beside it unless named
        otherwise; without them it decides at 0.5, applies no temperature and flags nothing.
        Stages that do not use the guard or that choose the threshold load without them, so
        they read no file that dvc.yaml does not declare for them. A threshold.json written
        before calibration existed has no temperature and means 1.0."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        card = ModelCard(**{**saved["card"], "class_names": tuple(saved["card"]["class_names"])})
        model = create_model(card.arch, "none")
        model.load_state_dict(saved["state_dict"])
        model.to(device).eval()
        threshold_file = threshold_file or path.parent / THRESHOLD_FILE
        decision = {"threshold": 0.5}
        if with_threshold and threshold_file.is_file():
            decision = json.loads(threshold_file.read_text())
        guard_file = guard_file or path.parent / GUARD_FILE
        guard = None
        if with_guard and guard_file.is_file():
            guard = Guard.load(guard_file).to(device)
        return cls(
            model,
            card,
            float(decision["threshold"]),
            bool(decision.get("flip_tta")),
            guard,
            float(decision.get("temperature", 1.0)),
        )

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) arrays to the normalized (N, 1, H, W) float input."""
        device = next(self.model.parameters()).device
        pixels = torch.from_numpy(np.array(images, dtype=np.uint8))
        return normalize(pixels.to(device), self.card.mean, self.card.std)

    def load_image(self, path: Path | IO[bytes]) -> np.ndarray:
        return load_square(path, self.card.image_size, self.card.resize, self.card.intensity)

    @property
    def ood_threshold(self) -> float | None:
        return None if self.guard is None else float(self.guard.threshold)

    def label(self, probability: float) -> str:
        return self.card.class_names[int(probability >= self.threshold)]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pneumonia probability per uint8 image."""
        return self.assess(images, batch_size).probability

    @torch.no_grad()
    def assess(self, images: np.ndarray, batch_size: int = 64) -> Assessment:
        """Calibrated probabilities, the logits they come from and, with a guard, its scores
        and verdicts, from one forward pass."""
        logits, scores = [], []
        for start in range(0, len(images), batch_size):
            x = self.to_tensor(images[start : start + batch_size])
            if self.guard is None:
                logit = self.model(x).float()
            else:
                logit, features = forward_with_features(self.model, x)
                scores.append(self.guard(features))
            if self.flip_tta:
                logit = (logit.float() + self.model(x.flip(-1)).float()) / 2
            logits.append(logit.float())
        logit = torch.cat(logits).squeeze(1).cpu().numpy()
        probability = probability_from_logit(logit, self.temperature)
        if self.guard is None:
            return Assessment(probability, logit=logit)
        score = torch.cat(scores).cpu().numpy()
        verdict = out_of_distribution(score, self.ood_threshold)
        return Assessment(probability, score, verdict, logit)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
        """Each feature stage's spatially averaged features per uint8 image (the guard's input)."""
        batches = []
        for start in range(0, len(images), batch_size):
            _, stages = forward_with_features(
                self.model, self.to_tensor(images[start : start + batch_size])
            )
            batches.append([stage.cpu().numpy() for stage in stages])
        return [np.concatenate(stage) for stage in zip(*batches, strict=True)]


@dataclass(frozen=True)
class Decision:
    """What every deployed form (CLI, MLflow model, web page and API) reports for one image.

    An image the guard flags gets a warning and no label: the probability is still reported
    for audit, but nothing should be read from it.
    """

    probability: float
    label: str | None
    threshold: float
    ood_score: float | None
    ood_threshold: float | None
    in_distribution: bool | None  # None: the model has no guard
    warning: str | None


class Deciding(Protocol):
    """What `decide` needs: `Classifier` and `cxr.onnx_model.OnnxClassifier` both have it."""

    threshold: float

    @property
    def ood_threshold(self) -> float | None: ...

    def assess(self, images: np.ndarray) -> Assessment: ...

    def label(self, probability: float) -> str: ...


def decide(classifier: Deciding, images: np.ndarray) -> list[Decision]:
    """One decision per uint8 image, from one forward pass over the batch."""
    assessment = classifier.assess(images)
    ood_threshold = classifier.ood_threshold
    decisions = []
    for i, probability in enumerate(assessment.probability.tolist()):
        score = None if assessment.ood_score is None else float(assessment.ood_score[i])
        flagged = assessment.out_of_distribution is not None and bool(
            assessment.out_of_distribution[i]
        )
        if score is not None and not math.isfinite(score):
            score = None  # JSON has no NaN; the warning says what happened
            warning = "the input guard could not score this image: no diagnosis is given"
        elif flagged:
            warning = (
                f"not like the chest X-rays this model was trained on (input guard score "
                f"{score:.3g} above {ood_threshold:.3g}): no diagnosis is given"
            )
        else:
            warning = None
        decisions.append(
            Decision(
                probability=probability,
                label=None if flagged else classifier.label(probability),
                threshold=classifier.threshold,
                ood_score=score,
                ood_threshold=ood_threshold,
                in_distribution=None if ood_threshold is None else not flagged,
                warning=warning,
            )
        )
    return decisions
