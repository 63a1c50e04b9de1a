"""Grad-CAM maps must be well-formed, release their hooks, and pass the checks they report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxr.explain import (
    CAM_METHODS,
    compute_cams,
    energy_in_box,
    faithfulness,
    pointing_game_hit,
    random_pointing_rate,
    randomization_check,
    rank_correlation,
    resolve_target_layer,
)
from cxr.figures import overlay, save_montage, save_panel
from cxr.model import create_model
from cxr.sampling import scoring_sample

SIZE = 64
SQUARE = 10
# test_resnet's layer2 has stride 8: an 8x8 map at 64 px, fine enough to point at a square.
LAYER = "layer2"
FAITHFULNESS_KEYS = {
    "road_morf_logit_drop",
    "road_lerf_logit_change",
    "road_combined",
    "cam_mult_logit_change",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions run several times faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def squares(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Noise images; positives carry a bright square, whose box is returned for every image."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (count, 1, SIZE, SIZE)).astype(np.float32)
    labels = (np.arange(count) % 2).astype(np.float32)
    boxes = []
    for image, label in zip(images, labels, strict=True):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - SQUARE, 2))
        boxes.append((x0, y0, x0 + SQUARE, y0 + SQUARE))
        image[0, y0 : y0 + SQUARE, x0 : x0 + SQUARE] += 2.0 * label
    return torch.from_numpy(images), torch.from_numpy(labels), boxes


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """test_resnet taught to find the square in ~50 steps: a model whose maps mean something."""
    torch.manual_seed(0)
    model = create_model("test_resnet", "none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(50):
        images, labels, _ = squares(32, seed=step)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def positives() -> tuple[torch.Tensor, list[tuple]]:
    images, labels, boxes = squares(16, seed=1000)
    keep = labels.bool()
    return images[keep], [box for box, k in zip(boxes, keep, strict=True) if k]


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    return create_model("densenet121", "none").eval()


def all_hooks(model: nn.Module) -> list[dict]:
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return [
        hooks
        for module in model.modules()
        for name in hook_dicts
        if (hooks := getattr(module, name))
    ]


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_maps_are_float32_at_the_input_size(densenet: nn.Module, method: str) -> None:
    inputs = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cams = compute_cams(densenet, inputs, method, resolve_target_layer(densenet), batch_size=1)
    assert cams.shape == (2, SIZE, SIZE)
    assert cams.dtype == np.float32


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_each_map_spans_zero_to_one(
    trained: nn.Module, positives: tuple[torch.Tensor, list[tuple]], method: str
) -> None:
    images = positives[0][:3]
    cams = compute_cams(trained, images, method, resolve_target_layer(trained, LAYER))
    per_map = cams.reshape(len(images), -1)
    assert per_map.min(axis=1).tolist() == [0.0] * len(images)  # rescaled per image
    assert per_map.max(axis=1) == pytest.approx([1.0] * len(images), abs=1e-6)


class _LeaksNaN(nn.Module):
    """A degenerate layer: every activation, and so every gradient, is NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_a_layer_that_leaks_nan_gives_an_empty_map() -> None:
    torch.manual_seed(0)
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _LeaksNaN(), *head)
    cams = compute_cams(model, torch.randn(2, 1, 16, 16), "gradcam", model[1])
    assert cams.shape == (2, 16, 16)
    assert (cams == 0).all()


def test_default_target_layer_is_the_last_feature_block(densenet: nn.Module) -> None:
    assert resolve_target_layer(densenet) is densenet.features.norm5
    named = resolve_target_layer(densenet, "features.denseblock3")
    assert named is densenet.features.denseblock3


def test_unknown_target_layer_is_named_with_suggestions(densenet: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"features\.norm6.*features\.norm5"):
        resolve_target_layer(densenet, "features.norm6")


def test_unknown_method_is_refused(trained: nn.Module) -> None:
    with pytest.raises(ValueError, match="scorecam"):
        compute_cams(trained, torch.zeros(1, 1, SIZE, SIZE), "scorecam", trained.layer2)


def test_hooks_are_released(trained: nn.Module) -> None:
    layer = resolve_target_layer(trained, LAYER)
    assert not all_hooks(trained)
    for method in ("gradcam", "eigencam"):
        compute_cams(trained, torch.randn(2, 1, SIZE, SIZE), method, layer)
        assert not layer._forward_hooks
        assert not layer._backward_hooks
        assert not layer._backward_pre_hooks
        assert not all_hooks(trained)


def test_trained_maps_point_at_the_square_well_above_chance(
    trained: nn.Module, positives: tuple[torch.Tensor, list[tuple]]
) -> None:
    images, boxes = positives
    cams = compute_cams(trained, images, "gradcam", resolve_target_layer(trained, LAYER))
    hit_rate = np.mean([pointing_game_hit(cam, box) for cam, box in zip(cams, boxes, strict=True)])
    assert random_pointing_rate(boxes, SIZE) == pytest.approx(SQUARE**2 / SIZE**2)
    assert hit_rate >= 0.5
    energies = [energy_in_box(cam, box) for cam, box in zip(cams, boxes, strict=True)]
    assert np.mean(energies) > 2 * SQUARE**2 / SIZE**2


def test_pointing_game_on_known_maps() -> None:
    cam = np.zeros((10, 20), dtype=np.float32)
    cam[3, 15] = 1.0  # row 3, column 15
    assert pointing_game_hit(cam, (14, 2, 16, 4))
    assert not pointing_game_hit(cam, (0, 0, 15, 10))  # x1 is exclusive
    assert not pointing_game_hit(cam, (15, 4, 20, 10))  # y0 below the peak
    with pytest.raises(ValueError, match="box"):
        pointing_game_hit(cam, (5, 5, 5, 8))


def test_energy_in_box_on_known_maps() -> None:
    box = (2, 4, 6, 7)  # 4 wide, 3 high
    inside = np.zeros((10, 10), dtype=np.float32)
    inside[4:7, 2:6] = 1.0
    assert energy_in_box(inside, box) == pytest.approx(1.0)
    assert energy_in_box(np.ones((10, 10)), box) == pytest.approx(12 / 100)
    assert energy_in_box(np.zeros((10, 10)), box) == 0.0


def test_random_pointing_rate_is_mean_box_area_over_image_area() -> None:
    boxes = [(0, 0, 10, 10), (5, 5, 15, 25)]  # areas 100 and 200
    assert random_pointing_rate(boxes, 100) == pytest.approx(150 / 10_000)
    assert random_pointing_rate([(0, 0, 8, 8)], 8) == pytest.approx(1.0)


def test_randomized_model_gives_clearly_different_maps(
    trained: nn.Module, positives: tuple[torch.Tensor, list[tuple]]
) -> None:
    images, _ = positives
    layer = resolve_target_layer(trained, LAYER)
    cams = compute_cams(trained, images, "gradcam", layer)
    weights = {k: v.clone() for k, v in trained.state_dict().items()}
    rng_state = torch.get_rng_state()

    randomized = randomization_check(trained, images, "gradcam", LAYER, cams, seed=0)
    again = compute_cams(trained, images, "gradcam", layer)

    assert rank_correlation(cams, again) == pytest.approx(1.0)
    assert randomized < 0.5
    assert randomization_check(trained, images, "gradcam", LAYER, cams, seed=0) == randomized
    # The check works on a copy and its own random stream.
    for key, value in trained.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_rank_correlation_treats_constant_maps_as_unrelated() -> None:
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    assert rank_correlation(ramp, ramp) == pytest.approx(1.0)
    assert rank_correlation(ramp, 1 - ramp) == pytest.approx(-1.0)
    assert rank_correlation(ramp, np.zeros_like(ramp)) == 0.0


def test_faithfulness_scores_are_finite_and_favour_the_real_maps(
    trained: nn.Module, positives: tuple[torch.Tensor, list[tuple]]
) -> None:
    images = positives[0][:4]
    cams = compute_cams(trained, images, "gradcam", resolve_target_layer(trained, LAYER))
    scores = faithfulness(trained, images, cams)
    assert set(scores) == FAITHFULNESS_KEYS
    assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
    assert scores["road_combined"] == pytest.approx(
        (scores["road_morf_logit_drop"] + scores["road_lerf_logit_change"]) / 2
    )
    assert faithfulness(trained, images, cams) == scores  # imputation noise is seeded
    inverted = faithfulness(trained, images, 1 - cams)
    assert scores["road_morf_logit_drop"] > inverted["road_morf_logit_drop"]
    assert scores["road_combined"] > inverted["road_combined"]


def test_overlay_colours_cold_blue_and_hot_red_in_rgb_order() -> None:
    black = np.zeros((8, 8), dtype=np.uint8)
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[:, 4:] = 1.0

    picture = overlay(black, cam)

    assert picture.dtype == np.uint8
    assert picture.shape == (8, 8, 3)
    assert (picture[:, :4] == [0, 0, 255]).all()  # jet's cold end; BGR order would show red
    assert (picture[:, 4:] == [255, 0, 0]).all()


def test_overlay_keeps_the_xray_visible() -> None:
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))  # brighter to the right

    picture = overlay(ramp, np.zeros((8, 8), dtype=np.float32)).astype(int)

    assert (np.diff(picture, axis=1) > 0).all()  # every channel brightens with the X-ray


def test_panel_and_montage_are_readable_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(5)]
    cams = [rng.random((SIZE, SIZE)).astype(np.float32) for _ in range(5)]

    panel = tmp_path / "cases" / "panel.png"
    save_panel(panel, images[0], cams[0], "TP  label PNEUMONIA  p=0.93", box=(10, 20, 30, 40))
    montage = tmp_path / "montage.png"
    save_montage(montage, images, cams, [f"case {i}" for i in range(5)], columns=3)

    with Image.open(panel) as png:
        assert png.format == "PNG"
        assert png.size == (2 * 256, 256 + 45)  # two 256 px panels from a 64 px image, a title
    with Image.open(montage) as png:
        assert png.format == "PNG"
        assert png.size == (3 * 256, 2 * (256 + 30))  # 3 columns, 2 rows of titled overlays
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cases", "montage.png", "panel.png"]


# --- scoring_sample ------------------------------------------------------------------------


def test_scoring_sample_is_in_proportion_to_class_frequency() -> None:
    labels = np.array([0] * 30 + [1] * 70)  # ordered by class, like the split files

    rows = scoring_sample(labels, 10, seed=0)

    assert rows.tolist() == sorted(set(rows.tolist()))  # sorted, no row twice
    assert np.bincount(labels[rows]).tolist() == [3, 7]


def test_scoring_sample_gives_largest_remainders_the_leftover_rows() -> None:
    labels = np.array([0] * 15 + [1] * 25 + [2] * 60)  # quotas 1.05, 1.75, 4.2 of 7

    rows = scoring_sample(labels, 7, seed=0)

    assert np.bincount(labels[rows]).tolist() == [1, 2, 4]


def test_scoring_sample_keeps_a_rare_class() -> None:
    labels = np.array(["NORMAL"] * 2 + ["PNEUMONIA"] * 198)  # a quota of 0.05 rounds to 0

    rows = scoring_sample(labels, 5, seed=0)

    assert rows.size == 5
    assert sorted(labels[rows].tolist()) == ["NORMAL"] + ["PNEUMONIA"] * 4


def test_scoring_sample_is_seeded() -> None:
    labels = np.array([0] * 30 + [1] * 70)

    first = scoring_sample(labels, 10, seed=3)

    assert scoring_sample(labels, 10, seed=3).tolist() == first.tolist()
    assert scoring_sample(labels, 10, seed=4).tolist() != first.tolist()


@pytest.mark.parametrize("count", [6, 7, 100])
def test_scoring_sample_of_at_least_every_row_is_every_row(count: int) -> None:
    labels = np.array([1, 1, 0, 1, 0, 0])
    assert scoring_sample(labels, count, seed=0).tolist() == [0, 1, 2, 3, 4, 5]


def test_scoring_sample_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="-1"):
        scoring_sample(np.array([0, 1]), -1, seed=0)
