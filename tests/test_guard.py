"""The input guard: its Mahalanobis score, its threshold, the stage that fits and measures it,
and the CLI and ONNX file that apply it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from cxr.classifier import Classifier, decide
from cxr.guard import Guard, fit_guard, out_of_distribution
from cxr.ood_set import KINDS, ood_images
from cxr.predict import main as predict
from cxr.processed import load_split


def gaussian_stages(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Two feature stages of two classes with different means and correlated features."""
    labels = rng.integers(0, 2, n)
    stages = []
    for width in (3, 6):
        mixing = rng.normal(size=(width, width))
        stages.append(rng.normal(size=(n, width)) @ mixing + 4.0 * labels[:, None])
    return stages, labels


def test_stage_distance_is_sklearns_mahalanobis_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    train, labels = gaussian_stages(rng, 400)
    guard = fit_guard(train, labels, np.arange(len(labels)))
    new, _ = gaussian_stages(rng, 50)
    new[1][:5] += 30.0  # far from both classes in the second stage only
    distances = guard.stage_distances([torch.from_numpy(f) for f in new]).numpy()
    for stage, (features, fitted) in enumerate(zip(train, new, strict=True)):
        means = [features[labels == c].mean(axis=0) for c in (0, 1)]
        centered = features - np.stack(means)[labels]
        covariance = LedoitWolf(assume_centered=True).fit(centered)
        expected = np.min([covariance.mahalanobis(fitted - m) for m in means], axis=0)
        np.testing.assert_allclose(distances[stage], expected, rtol=1e-4)
    # the score is the largest stage distance, each in units of its scale
    scores = guard([torch.from_numpy(f) for f in new]).numpy()
    np.testing.assert_allclose(scores, (distances / guard.scales.numpy()[:, None]).max(axis=0))
    assert scores[:5].min() > 10 * np.median(scores[5:])


def test_each_stage_is_scaled_so_an_unseen_xray_sits_at_its_median():
    """In-sample distances shrink with a stage's width (a 100-wide stage fitted on 150 images
    scores its own images ~1.4x closer than new ones), so scaling by them lets the widest stage
    decide every real image's score; held-out (cross-fitted) scales put each at 1x."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[list[np.ndarray], np.ndarray]:
        labels = rng.integers(0, 2, n)
        spread = [np.logspace(-1, 1, width) for width in (4, 100)]  # unequal variances
        return [rng.normal(size=(n, s.size)) * s + 3.0 * labels[:, None] for s in spread], labels

    train, labels = draw(150)
    guard = fit_guard(train, labels, np.arange(150) // 2)  # two images per patient
    new, _ = draw(1000)
    distances = guard.stage_distances([torch.from_numpy(f) for f in new]).numpy()
    ratio = np.median(distances, axis=1) / guard.scales.numpy()
    assert ratio == pytest.approx([1.0, 1.0], abs=0.25)


def test_a_score_that_is_not_a_number_is_flagged():
    scores = np.array([0.5, 1.0, 1.5, np.nan, np.inf, -np.inf])
    assert out_of_distribution(scores, 1.0).tolist() == [False, False, True, True, True, True]
    guard = fit_guard(*gaussian_stages(np.random.default_rng(3), 60), np.arange(60))
    with pytest.raises(ValueError, match="1 validation scores are not finite"):
        guard.calibrate(np.array([1.0, np.nan, 2.0]), 0.99)


def test_threshold_is_the_validation_quantile_and_survives_a_round_trip(tmp_path: Path):
    rng = np.random.default_rng(1)
    train, labels = gaussian_stages(rng, 300)
    guard = fit_guard(train, labels, np.arange(len(labels)))
    val, _ = gaussian_stages(rng, 200)
    val_scores = guard([torch.from_numpy(f) for f in val]).numpy()
    guard.calibrate(val_scores, 0.99)
    assert float(guard.threshold) == pytest.approx(np.quantile(val_scores, 0.99), rel=1e-6)
    assert (val_scores > float(guard.threshold)).sum() == 2  # 1% of 200
    guard.save(tmp_path / "guard.pt")
    loaded = Guard.load(tmp_path / "guard.pt")
    assert float(loaded.quantile) == pytest.approx(0.99)
    assert torch.equal(loaded([torch.from_numpy(f) for f in val]), torch.from_numpy(val_scores))


def test_ood_set_has_every_kind_decodable_and_the_synthetic_kind_only_when_asked():
    xrays = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    made = ood_images(xrays, 3, seed=0, synthetic=True)
    kinds = [kind for kind, _ in made]
    assert {kind: kinds.count(kind) for kind in KINDS} == dict.fromkeys(KINDS, 3)
    assert "synthetic" not in {kind for kind, _ in ood_images(xrays, 3, 0, synthetic=False)}
    decoded = {kind: np.asarray(Image.open(io.BytesIO(png))) for kind, png in made}
    np.testing.assert_array_equal(decoded["inverted"], 255 - xrays[2])
    np.testing.assert_array_equal(decoded["flipped"], xrays[2][::-1])
    assert decoded["cropped"].shape[0] < 32 // 2
    assert ood_images(xrays, 3, 0, True) == made  # seeded


def test_guard_stage_writes_metrics_that_its_scores_reproduce(trained: Path):
    report = json.loads((trained / "metrics/guard.json").read_text())
    scores = pd.read_csv(trained / "plots/guard/scores.csv")
    guard = Guard.load(trained / "models/guard.pt")
    assert report["threshold"] == pytest.approx(float(guard.threshold))
    assert report["quantile"] == 0.99
    real = scores["kind"] == "test X-ray"
    assert (
        report["test_images"]
        == real.sum()
        == len(load_split("test", trained / "data/processed").labels)
    )
    assert report["test_flagged"] == pytest.approx(
        (scores.loc[real, "score"] > guard.threshold.item()).mean()
    )
    assert report["ood"]["auroc"] == pytest.approx(roc_auc_score(~real, scores["score"]))
    # the demo model meets no synthetic images: it was trained on them
    assert sorted(report["by_kind"]) == sorted(set(KINDS) - {"synthetic"})
    assert all(k["images"] == 8 for k in report["by_kind"].values())  # TINY_PARAMS guard.ood_images
    for name in ("scores.png", "examples.png"):
        assert (trained / "plots/guard" / name).stat().st_size > 0
    # the scores in the file are the ones the deployed classifier computes
    classifier = Classifier.load(trained / "models/model.pt")
    test = load_split("test", trained / "data/processed")
    np.testing.assert_allclose(
        classifier.assess(np.asarray(test.images)).ood_score, scores.loc[real, "score"], rtol=1e-5
    )
    # and the reported threshold is the validation split's quantile, not a self-consistent
    # number from any split (a threshold set on the training images flags most test X-rays)
    val = classifier.assess(np.asarray(load_split("val", trained / "data/processed").images))
    assert report["threshold"] == pytest.approx(np.quantile(val.ood_score, 0.99), rel=1e-5)
    assert val.out_of_distribution.sum() == np.ceil(0.01 * len(val.ood_score))


def noise_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90), dtype=np.uint8)).save(path)
    return path


def passing_xray(classifier: Classifier, folder: Path) -> Path:
    """A test X-ray file the guard lets through (the tiny model's guard flags a few)."""
    files = sorted((folder / "data/raw/test/PNEUMONIA").iterdir())
    passed = decide(classifier, np.stack([classifier.load_image(f) for f in files]))
    return next(f for f, d in zip(files, passed, strict=True) if d.in_distribution)


def test_a_flagged_image_gets_a_warning_and_no_diagnosis(trained: Path):
    classifier = Classifier.load(trained / "models/model.pt")
    noise = classifier.load_image(noise_png(trained.parent / "noise.png"))
    xray = classifier.load_image(passing_xray(classifier, trained))[np.newaxis]
    flagged, passed = decide(classifier, np.stack([noise, xray[0]]))
    assert flagged.in_distribution is False and flagged.label is None
    assert flagged.ood_score > flagged.ood_threshold
    assert f"above {flagged.ood_threshold:.3g}): no diagnosis is given" in flagged.warning
    assert passed.in_distribution is True and passed.warning is None
    assert passed.label == classifier.label(passed.probability)
    classifier.guard = None  # a model without a guard still decides, and says nothing of it
    (bare,) = decide(classifier, xray)
    assert bare.in_distribution is None and bare.ood_score is None
    assert bare.probability == pytest.approx(passed.probability)


def test_an_image_the_guard_cannot_score_gets_no_diagnosis(trained: Path):
    classifier = Classifier.load(trained / "models/model.pt")
    classifier.guard.means_0.fill_(float("nan"))  # every score becomes NaN
    xray = classifier.load_image(
        passing_xray(Classifier.load(trained / "models/model.pt"), trained)
    )
    (decision,) = decide(classifier, xray[np.newaxis])
    assert decision.in_distribution is False and decision.label is None
    assert decision.ood_score is None  # JSON has no NaN
    assert decision.warning == "the input guard could not score this image: no diagnosis is given"


def test_cli_withholds_the_diagnosis_and_overlay_of_a_flagged_image(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    noise = noise_png(tmp_path / "noise.png")
    xray = passing_xray(Classifier.load(trained / "models/model.pt"), trained)
    assert (
        predict(
            [
                str(noise),
                str(xray),
                "--model",
                str(trained / "models/model.pt"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "input guard on" in lines[0]
    assert lines[1].startswith(f"{noise}  OUT OF DISTRIBUTION: not like the chest X-rays")
    assert lines[2].startswith(f"{xray}  p(pneumonia)=") and "  guard " in lines[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{xray.stem}_gradcam.png"]
