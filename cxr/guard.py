"""The input guard: flags an image unlike the training X-rays instead of diagnosing it.

A classifier gives every input a confident answer, a photo or a page of text included. The
guard scores how far an image's features lie from the training X-rays': the Mahalanobis
distance of Lee et al. (NeurIPS 2018, "A simple unified framework for detecting
out-of-distribution samples"), with one Gaussian per class and a covariance shared by the
classes, fitted on the trained network's features of the training split. The features are the
spatial averages of every feature stage of the network (timm's `forward_intermediates`), not
only the last one: early stages see what an X-ray looks like at the pixel level (grain, edges,
exposure), where noise, text and photos differ most, and late stages see anatomy. Each stage's
distance is divided by its median over held-out training images (cross-fitted: each fold
scored by Gaussians fitted without its patients), so the stages count alike for an X-ray the
fit has not seen, and an image's score is the largest of them. Scaling by the distances of the
very images the Gaussians were fitted on would not: in-sample distances shrink with a stage's
width, so the wide, deep stages would decide every real X-ray's score. The covariances are
shrunk (Ledoit-Wolf, scikit-learn): a stage can have more channels than the training split has
images. The guard stores a whitening matrix W per stage (precision = W Wᵀ, its Cholesky
factor) and computes a distance as the squared length of (x - mean) W: a sum of squares, which
float32 computes as accurately in PyTorch as in onnxruntime, where the quadratic form
(x - mean)ᵀ P (x - mean) cancels large terms and does not.

The threshold is a quantile of the scores of the validation split (in distribution, not seen
by the fit), so by construction about 1 - quantile of real X-rays are flagged. A score that is
not a finite number (a NaN from a degenerate input) is flagged too: only a score known to be
at or under the threshold lets an image through. The score runs in torch, in the same graph as
the network, so the CLI, the MLflow model, the page and the ONNX file compute it identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from cxr.atomic import atomic_path
from cxr.model import normalize
from cxr.params import Section


class GuardParams(Section):
    quantile: Annotated[float, Field(ge=0.5, lt=1)]  # threshold: this quantile of validation's
    ood_images: Annotated[int, Field(ge=2)]  # images of each kind in the set that measures it


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """One forward pass: the logits and each feature stage's spatial average (N, channels)."""
    final, stages = model.forward_intermediates(x)
    return model.forward_head(final), [stage.float().mean(dim=(2, 3)) for stage in stages]


class Guard(nn.Module):
    """Per-stage class means, shared whitening and scale; `forward` scores pooled features."""

    def __init__(self, means: list[torch.Tensor], whitening: list[torch.Tensor]) -> None:
        super().__init__()
        for i, (mean, whiten) in enumerate(zip(means, whitening, strict=True)):
            self.register_buffer(f"means_{i}", mean.float())
            self.register_buffer(f"whitening_{i}", whiten.float())
        self.register_buffer("scales", torch.ones(len(means)))
        self.register_buffer("threshold", torch.tensor(float("inf")))
        self.register_buffer("quantile", torch.tensor(1.0))

    @property
    def stages(self) -> int:
        return len(self.scales)

    def stage_distances(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(stages, N) squared Mahalanobis distance to the nearest class mean, unscaled."""
        if len(features) != self.stages:
            raise ValueError(f"{len(features)} feature stages given, the guard has {self.stages}")
        distances = []
        for i, stage in enumerate(features):
            centered = stage.float()[:, None, :] - getattr(self, f"means_{i}")[None]  # (N, C, d)
            squared = (centered @ getattr(self, f"whitening_{i}")).square().sum(dim=-1)
            distances.append(squared.min(dim=1).values)
        return torch.stack(distances)

    def scaled_distances(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(stages, N) stage distances in units of each stage's held-out median."""
        return self.stage_distances(features) / self.scales[:, None]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The out-of-distribution score per image: the largest scaled stage distance."""
        return self.scaled_distances(features).max(dim=0).values

    def calibrate(self, in_distribution: np.ndarray, quantile: float) -> None:
        """Set the threshold at `quantile` of in-distribution scores (the validation split)."""
        bad = int((~np.isfinite(in_distribution)).sum())
        if bad:
            raise ValueError(f"{bad} validation scores are not finite: the guard cannot be set")
        self.quantile.fill_(quantile)
        self.threshold.fill_(float(np.quantile(in_distribution, quantile)))

    def save(self, path: Path) -> None:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: Path) -> Guard:
        state = torch.load(path, map_location="cpu", weights_only=True)
        count = len(state["scales"])
        guard = cls(
            [state[f"means_{i}"] for i in range(count)],
            [state[f"whitening_{i}"] for i in range(count)],
        )
        guard.load_state_dict(state)
        return guard.eval()


class GuardedNetwork(nn.Module):
    """The network and its guard in one graph: uint8 pixels (N, 1, H, W) in, normalized with
    the card's mean and std by `cxr.model.normalize` as in training, (logits, guard scores)
    out. The ONNX file holds this graph, so a runtime feeds it decoded images as they are and
    has no normalization of its own to get wrong."""

    def __init__(self, model: nn.Module, guard: Guard, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.guard, self.mean, self.std = model, guard, mean, std

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = forward_with_features(self.model, normalize(pixels, self.mean, self.std))
        return logits, self.guard(features)


def out_of_distribution(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The guard's verdict: flagged unless the score is a finite number at most the threshold
    (`score > threshold` would let a NaN through)."""
    return ~(np.isfinite(scores) & (scores <= threshold))


def fit_guard(
    features: list[np.ndarray], labels: np.ndarray, groups: np.ndarray, folds: int = 5
) -> Guard:
    """Class-conditional Gaussians with a shared, shrunk covariance per feature stage, each
    stage scaled by its median distance over held-out folds of patients (`groups`)."""
    guard = _gaussians(features, labels)
    held_out = np.empty((len(features), len(labels)))
    splitter = StratifiedGroupKFold(min(folds, len(np.unique(groups))))
    for fit, out in splitter.split(features[0], labels, groups):
        fold = _gaussians([stage[fit] for stage in features], labels[fit])
        with torch.no_grad():
            held_out[:, out] = fold.stage_distances([torch.from_numpy(f[out]) for f in features])
    guard.scales.copy_(torch.from_numpy(np.median(held_out, axis=1)))
    return guard


def _gaussians(features: list[np.ndarray], labels: np.ndarray) -> Guard:
    classes = np.unique(labels)
    means, whitening = [], []
    for stage in features:
        stage = stage.astype(np.float64)
        class_means = np.stack([stage[labels == c].mean(axis=0) for c in classes])
        centered = stage - class_means[np.searchsorted(classes, labels)]
        means.append(torch.from_numpy(class_means))
        precision = LedoitWolf(assume_centered=True).fit(centered).precision_
        whitening.append(torch.from_numpy(np.linalg.cholesky(precision)))
    return Guard(means, whitening).eval()
