"""A trained model in use: one decision layer over the backend that runs the network.

A backend turns uint8 X-rays into the network's logits and the input guard's scores, and
nothing more: the PyTorch network loaded from models/ (`TorchBackend`, which also gives what
only PyTorch has: the network for Grad-CAM and its features for the guard's fit) or the exported
graph on onnxruntime (`cxr.onnx_model`). What is made of those numbers, flip TTA, the
validation-fitted temperature, the validation-chosen threshold and the guard's verdict, is
applied once, here, by `Classifier`, so no deployed form can decide differently from another.

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

from cxr.device import memory_format
from cxr.guard import Guard, GuardedNetwork, forward_with_features, out_of_distribution
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


def read_card(fields: dict) -> ModelCard:
    """The model card as a model file or the ONNX metadata stores it (class names as a list)."""
    return ModelCard(**{**fields, "class_names": tuple(fields["class_names"])})


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


class Backend(Protocol):
    """Runs the network and its guard: uint8 (N, H, W) images to float32 logits (N,) and guard
    scores (N,), None without a guard. The pixels are all it takes: normalizing them with the
    card's statistics is its own business, done by `cxr.model.normalize` in both backends."""

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


@dataclass
class TorchBackend:
    """The network and, when one is fitted, its guard in PyTorch, on the device they were
    loaded to; `mean` and `std` are the card's."""

    model: nn.Module
    mean: float
    std: float
    guard: Guard | None = None

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) arrays to uint8 (N, 1, H, W) on the network's device."""
        device = next(self.model.parameters()).device
        return torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).unsqueeze(1)

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) arrays to the normalized (N, 1, H, W) float input."""
        return normalize(self.pixels(images), self.mean, self.std)

    def network(self) -> GuardedNetwork:
        """The network and guard as one module, pixels in: what the ONNX file holds."""
        if self.guard is None:
            raise ValueError("the model has no input guard (models/guard.pt)")
        return GuardedNetwork(self.model, self.guard, self.mean, self.std)

    @torch.no_grad()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.guard is None:
            return _numpy(self.model(self.to_tensor(images))[:, 0]), None
        logit, score = self.network()(self.pixels(images))
        return _numpy(logit[:, 0]), _numpy(score)

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


@dataclass
class Classifier:
    """A model's backend with its card and the decision settings chosen on validation.

    `flip_tta` averages the logits of each image and its mirror image; `temperature` divides
    that logit before the sigmoid (1.0: none). The threshold was chosen on probabilities
    computed the same way, so the three travel together in threshold.json. `ood_threshold` is
    the guard's: a score above it, or no score at all (NaN), flags the image; None when the
    model has no guard, which flags nothing.
    """

    backend: Backend
    card: ModelCard
    threshold: float
    flip_tta: bool = False
    temperature: float = 1.0
    ood_threshold: float | None = None

    @classmethod
    def from_settings(cls, backend: Backend, card: ModelCard, settings: dict) -> Classifier:
        """With the decision settings as threshold.json (and the ONNX file's metadata) stores
        them; one written before calibration existed has no temperature and means 1.0."""
        ood_threshold = settings.get("ood_threshold")
        return cls(
            backend,
            card,
            float(settings["threshold"]),
            bool(settings.get("flip_tta")),
            float(settings.get("temperature", 1.0)),
            None if ood_threshold is None else float(ood_threshold),
        )

    @classmethod
    def load(
        cls,
        path: Path,
        device: str = "cpu",
        threshold_file: Path | None = None,
        guard_file: Path | None = None,
        with_guard: bool = True,
        with_threshold: bool = True,
        channels_last: bool = True,
    ) -> Classifier:
        """The model file on PyTorch, and the decision settings and guard stored beside it
        unless named otherwise; without them it decides at 0.5, applies no temperature and
        flags nothing. Stages that do not use the guard or that choose the threshold load
        without them, so they read no file that dvc.yaml does not declare for them.

        The weights go channels_last unless told otherwise (`runtime.channels_last` in the
        stages): in fp32 on the CPU that runs DenseNet121 2-3x faster than NCHW
        (bench/inference.py), the difference in a logit is rounding, and the one-channel input
        is already in either layout.
        """
        saved = torch.load(path, map_location="cpu", weights_only=True)
        card = read_card(saved["card"])
        model = create_model(card.arch, "none")
        model.load_state_dict(saved["state_dict"])
        model.to(device, memory_format=memory_format(channels_last)).eval()
        threshold_file = threshold_file or path.parent / THRESHOLD_FILE
        settings = {"threshold": 0.5}
        if with_threshold and threshold_file.is_file():
            settings = json.loads(threshold_file.read_text())
        guard_file = guard_file or path.parent / GUARD_FILE
        guard = None
        if with_guard and guard_file.is_file():
            guard = Guard.load(guard_file).to(device)
        backend = TorchBackend(model, card.mean, card.std, guard)
        ood_threshold = None if guard is None else float(guard.threshold)
        return cls.from_settings(backend, card, settings | {"ood_threshold": ood_threshold})

    @property
    def pytorch(self) -> TorchBackend:
        """The PyTorch backend, for what only it gives: the network, its guard, its features."""
        if not isinstance(self.backend, TorchBackend):
            raise TypeError("this needs the PyTorch model (model.pt), not the ONNX graph")
        return self.backend

    @property
    def model(self) -> nn.Module:
        return self.pytorch.model

    @property
    def guard(self) -> Guard | None:
        return self.pytorch.guard

    @guard.setter
    def guard(self, guard: Guard | None) -> None:
        """Attach a calibrated guard, or drop it; its threshold is the one verdicts use."""
        self.pytorch.guard = guard
        self.ood_threshold = None if guard is None else float(guard.threshold)

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        return self.pytorch.to_tensor(images)

    def features(self, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
        return self.pytorch.features(images, batch_size)

    def load_image(self, path: Path | IO[bytes]) -> np.ndarray:
        return load_square(path, self.card.image_size, self.card.resize, self.card.intensity)

    def label(self, probability: float) -> str:
        return self.card.class_names[int(probability >= self.threshold)]

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Pneumonia probability per uint8 image."""
        return self.assess(images, batch_size).probability

    def assess(self, images: np.ndarray, batch_size: int = 64) -> Assessment:
        """Calibrated probabilities, the logits they come from and, with a guard, its scores
        and verdicts, from one pass of the backend (two with flip TTA)."""
        logits, scores = [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size])
            logit, score = self.backend.run(batch)
            if self.flip_tta:
                logit = (logit + self.backend.run(np.ascontiguousarray(batch[:, :, ::-1]))[0]) / 2
            logits.append(logit)
            scores.append(score)
        logit = np.concatenate(logits)
        probability = probability_from_logit(logit, self.temperature)
        if self.ood_threshold is None:
            return Assessment(probability, logit=logit)
        score = np.concatenate(scores)
        verdict = out_of_distribution(score, self.ood_threshold)
        return Assessment(probability, score, verdict, logit)


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


def decide(classifier: Classifier, images: np.ndarray) -> list[Decision]:
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
