"""The decision layer: flip TTA, the temperature, the threshold and the guard's verdict are
applied by `Classifier` alone, on whatever logits and scores its backend returns, so PyTorch and
onnxruntime cannot decide differently. A fake backend with known outputs pins each step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxr.classifier import Classifier, TorchBackend, decide
from cxr.guard import Guard
from cxr.model import ModelCard, create_model, save_model

CARD = ModelCard(arch="resnet10t", image_size=2, resize="pad", mean=0.5, std=0.25)


class FakeBackend:
    """Logit (top-left pixel - 100) / 10, so a mirror image gives the top-right pixel's; guard
    score the bottom-left pixel, NaN where it is 255; None without a guard. Keeps each batch."""

    def __init__(self, guard: bool = True) -> None:
        self.guard, self.batches = guard, []

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self.batches.append(images.copy())
        logit = (images[:, 0, 0].astype(np.float32) - 100) / 10
        score = images[:, 1, 0].astype(np.float32)
        return logit, np.where(score == 255, np.float32("nan"), score) if self.guard else None


def images(*rows: tuple[int, int, int]) -> np.ndarray:
    """2x2 uint8 images from (top-left, top-right, bottom-left) pixels."""
    return np.array([[[tl, tr], [bl, 0]] for tl, tr, bl in rows], dtype=np.uint8)


SETTINGS = {"threshold": 0.6, "flip_tta": True, "temperature": 2.0, "ood_threshold": 20.0}
# logit with flip TTA: 4, 0.6, 1, 5; guard score 10, 20 (at the threshold: passes), 21, NaN
BATCH = images((150, 130, 10), (106, 106, 20), (110, 110, 21), (100, 200, 255))


def test_flip_tta_temperature_threshold_and_verdict_are_applied_once_here():
    backend = FakeBackend()
    classifier = Classifier.from_settings(backend, CARD, SETTINGS)

    answer = classifier.assess(BATCH, batch_size=3)

    np.testing.assert_allclose(answer.logit, [4, 0.6, 1, 5], rtol=1e-6)  # with the mirror's
    np.testing.assert_array_equal(backend.batches[1], BATCH[:3, :, ::-1])  # the mirrored pass
    expected = 1 / (1 + np.exp(-np.array([4, 0.6, 1, 5]) / 2.0))  # sigmoid(logit / T)
    np.testing.assert_allclose(answer.probability, expected, rtol=1e-6)
    np.testing.assert_array_equal(answer.out_of_distribution, [False, False, True, True])
    np.testing.assert_array_equal(answer.ood_score[:3], [10, 20, 21])
    decisions = decide(classifier, BATCH)
    # sigmoid(0.6 / 2) = 0.57 is under the threshold 0.6; sigmoid(0.6) = 0.65 would not be
    assert [d.label for d in decisions] == ["PNEUMONIA", "NORMAL", None, None]
    assert [d.in_distribution for d in decisions] == [True, True, False, False]
    assert decisions[2].warning.endswith("(input guard score 21 above 20): no diagnosis is given")
    assert decisions[3].ood_score is None and "could not score" in decisions[3].warning


def test_without_a_guard_nothing_is_flagged_and_old_settings_mean_no_temperature():
    classifier = Classifier.from_settings(FakeBackend(guard=False), CARD, {"threshold": 0.5})
    assert (classifier.flip_tta, classifier.temperature, classifier.ood_threshold) == (
        False,
        1.0,
        None,
    )
    answer = classifier.assess(BATCH)
    np.testing.assert_allclose(answer.logit, [5, 0.6, 1, 0], rtol=1e-6)  # no mirrored pass
    np.testing.assert_allclose(answer.probability, 1 / (1 + np.exp(-answer.logit)), rtol=1e-6)
    assert answer.ood_score is None and answer.out_of_distribution is None
    assert {d.in_distribution for d in decide(classifier, BATCH)} == {None}


def test_the_guard_brings_its_threshold_and_only_pytorch_has_a_network():
    classifier = Classifier(TorchBackend(nn.Linear(1, 1), CARD.mean, CARD.std), CARD, 0.5)
    guard = Guard([torch.zeros(2, 3)], [torch.eye(3)])
    guard.calibrate(np.array([1.0, 2.0, 3.0]), 0.5)
    classifier.guard = guard
    assert classifier.ood_threshold == 2.0 and classifier.guard is guard
    classifier.guard = None
    assert classifier.ood_threshold is None
    with pytest.raises(TypeError, match="PyTorch"):
        _ = Classifier(FakeBackend(), CARD, 0.5).model


def test_load_puts_the_weights_channels_last_unless_told_and_the_logits_agree(tmp_path: Path):
    torch.manual_seed(0)
    card = ModelCard(arch="resnet10t", image_size=32, resize="pad", mean=0.5, std=0.25)
    save_model(tmp_path / "model.pt", create_model(card.arch, "none"), card)
    last = Classifier.load(tmp_path / "model.pt")
    nchw = Classifier.load(tmp_path / "model.pt", channels_last=False)

    def spatial_weights(classifier: Classifier) -> list[torch.Tensor]:
        """Convolution kernels whose two layouts differ (more than one input channel, k > 1)."""
        return [p for p in classifier.model.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1]

    assert spatial_weights(last) and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for w in spatial_weights(last)
    )
    assert all(w.is_contiguous() for w in spatial_weights(nchw))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(
        last.assess(pixels).logit, nchw.assess(pixels).logit, rtol=1e-4, atol=1e-5
    )
