"""Grad-CAM maps for the pneumonia logit, and the numbers that say whether to trust them.

The CAM math and the faithfulness metrics come from the grad-cam package (pytorch_grad_cam);
this module only wires them to a 1-channel, 1-logit model and adds the checks a heatmap needs
before anyone reads meaning into it: localization against lesion boxes (pointing game, energy
in box), faithfulness (ROAD, confidence change) and a model randomization sanity check, scored
on a class-stratified sample of images. Drawing the maps is left to `cxr.figures`, so this
module holds numbers only.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from scipy.stats import spearmanr
from torch import nn

from cxr.params import Section

CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
}

Box = tuple[int, int, int, int]


class GradcamParams(Section):
    method: Literal["gradcam", "gradcam++", "hirescam", "eigencam", "xgradcam", "layercam"]
    target_layer: str  # "" = the last feature block
    per_outcome: Annotated[int, Field(ge=1)]
    score_images: Annotated[int, Field(ge=2)]


# Share of pixels kept by each ROAD step; the package removes the rest, so 20..80 spans
# "remove 80 %" to "remove 20 %" of the most (or least) relevant pixels.
ROAD_PERCENTILES = (20, 40, 60, 80)
# ROAD fills removed pixels with noisy linear imputation; a fixed seed makes scores repeatable.
ROAD_SEED = 0
# Images per forward pass in faithfulness, to bound memory like compute_cams does.
METRIC_BATCH = 16


def _pneumonia_targets(count: int) -> list[BinaryClassifierOutputTarget]:
    """The package's target for a single-logit model: the logit itself, sign +1 (pneumonia)."""
    return [BinaryClassifierOutputTarget(1) for _ in range(count)]


def resolve_target_layer(model: nn.Module, name: str = "") -> nn.Module:
    """The layer whose activations the CAM weights; "" means the last feature block.

    timm records each architecture's feature stages in `feature_info`, so the default needs no
    per-architecture table (densenet121 -> features.norm5, resnets -> layer4).
    """
    if not name:
        feature_info = getattr(model, "feature_info", None)
        if not feature_info:
            raise ValueError("model has no timm feature_info: name the gradcam target layer")
        name = feature_info[-1]["module"]
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hints = difflib.get_close_matches(name, names, n=5, cutoff=0.3) or names[-5:]
        raise ValueError(
            f"gradcam target layer {name!r} is not a module of the model; "
            f"valid names include {', '.join(hints)}"
        ) from None


def compute_cams(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    target_layer: nn.Module,
    batch_size: int = 16,
) -> np.ndarray:
    """(N, H, W) float32 maps in [0, 1] of what raises the pneumonia logit.

    The CAM object is a context manager so its hooks leave the model even on error; gradients
    are switched on because callers often sit inside `torch.no_grad()`.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {sorted(CAM_METHODS)}")
    model.eval()
    device = next(model.parameters()).device
    maps = []
    with (
        CAM_METHODS[method](model=model, target_layers=[target_layer]) as cam,
        torch.enable_grad(),
    ):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device)
            maps.append(cam(input_tensor=batch, targets=_pneumonia_targets(len(batch))))
    # The package rescales each map to [0, 1]; resizing can overshoot by rounding, and a
    # degenerate layer can leak NaN, so pin both down for the metrics downstream.
    return np.clip(np.nan_to_num(np.concatenate(maps), nan=0.0), 0.0, 1.0).astype(np.float32)


def _inside(box: Box, shape: tuple[int, ...]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
        raise ValueError(f"box {box} is empty or outside a {shape[1]}x{shape[0]} map")
    return slice(y0, y1), slice(x0, x1)


def pointing_game_hit(cam: np.ndarray, box: Box, tolerance: int = 0) -> bool:
    """Whether the map's peak falls on the lesion: the localization test of Zhang et al. 2016.

    As there, a peak within `tolerance` pixels of the box counts. A coarse map upsampled to the
    image has flat peaks, so any peak pixel in the box counts, not only the first argmax.
    """
    rows, cols = _inside(_grown(box, tolerance, cam.shape), cam.shape)
    return bool(cam[rows, cols].max() >= cam.max())


def energy_in_box(cam: np.ndarray, box: Box) -> float:
    """Share of the map's mass on the lesion; unlike the pointing game it sees the whole map."""
    total = float(cam.sum())
    if total <= 0:
        return 0.0
    return float(cam[_inside(box, cam.shape)].sum()) / total


def random_pointing_rate(boxes: list[Box], size: int, tolerance: int = 0) -> float:
    """Hit rate of a uniformly random peak: big boxes are easy to hit, so this is the bar.

    With tolerance 0 it is also the energy share a uniform map puts in the boxes.
    """
    if not boxes:
        raise ValueError("no boxes to compute a pointing-game baseline for")
    grown = [_grown(box, tolerance, (size, size)) for box in boxes]
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in grown]
    return float(np.mean(areas)) / (size * size)


def _grown(box: Box, margin: int, shape: tuple[int, ...]) -> Box:
    x0, y0, x1, y1 = box
    height, width = shape[:2]
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(width, x1 + margin),
        min(height, y1 + margin),
    )


def faithfulness(model: nn.Module, inputs: torch.Tensor, cams: np.ndarray) -> dict[str, float]:
    """Whether the maps mark pixels the pneumonia logit actually depends on.

    Scores are means over images (and over ROAD_PERCENTILES for ROAD), in logit units, all
    oriented so that HIGHER MEANS MORE FAITHFUL:

    - road_morf_logit_drop: how much the logit falls when the most relevant pixels are removed
      (package ROADMostRelevantFirst, sign flipped). Large = the marked pixels matter.
    - road_lerf_logit_change: logit change when the least relevant pixels are removed
      (ROADLeastRelevantFirst). Near 0 or positive = the unmarked pixels do not matter.
    - road_combined: the mean of the two above, i.e. the package's ROADCombined.
    - cam_mult_logit_change: logit change when the input is multiplied by the map, keeping only
      what it marks (CamMultImageConfidenceChange). Near 0 or positive = the map holds the
      evidence.

    ROAD's noisy linear imputer solves one system per channel, so 1-channel input works as is;
    where a map removes every pixel (a constant map, or ties at a percentile) it fills the image
    with 0 (the training mean after normalization) plus its small noise.
    """
    model.eval()
    device = next(model.parameters()).device
    morf = _metric_scores(
        model, inputs, cams, device, [ROADMostRelevantFirst(p) for p in ROAD_PERCENTILES]
    )
    lerf = _metric_scores(
        model, inputs, cams, device, [ROADLeastRelevantFirst(p) for p in ROAD_PERCENTILES]
    )
    mult = _metric_scores(model, inputs, cams, device, [CamMultImageConfidenceChange()])
    morf_drop, lerf_change = -float(morf.mean()), float(lerf.mean())
    return {
        "road_morf_logit_drop": morf_drop,
        "road_lerf_logit_change": lerf_change,
        "road_combined": (morf_drop + lerf_change) / 2,
        "cam_mult_logit_change": float(mult.mean()),
    }


def _metric_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    cams: np.ndarray,
    device: torch.device,
    metrics: list[Callable],
) -> np.ndarray:
    """(metrics, N) changes of the pneumonia logit after each metric's perturbation."""
    scores = []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # The package hands torch masks to numpy, which numpy 2 flags; harmless, and not ours.
        warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
        torch.manual_seed(ROAD_SEED)
        for metric in metrics:
            per_image = []
            for start in range(0, len(inputs), METRIC_BATCH):
                batch = inputs[start : start + METRIC_BATCH].to(device)
                maps = cams[start : start + METRIC_BATCH]
                per_image.append(metric(batch, maps, _pneumonia_targets(len(batch)), model))
            scores.append(np.concatenate(per_image).reshape(-1))
    return np.stack(scores)


def rank_correlation(cams_a: np.ndarray, cams_b: np.ndarray) -> float:
    """Mean per-image Spearman correlation of two (N, H, W) map stacks; a constant map -> 0."""
    if cams_a.shape != cams_b.shape:
        raise ValueError(f"map stacks differ in shape: {cams_a.shape} vs {cams_b.shape}")
    values = []
    for a, b in zip(cams_a, cams_b, strict=True):
        # spearmanr is undefined (NaN, with a warning) when either map has no ranking at all.
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            values.append(0.0)
            continue
        rho = spearmanr(a.ravel(), b.ravel()).statistic
        values.append(0.0 if np.isnan(rho) else float(rho))
    return float(np.mean(values))


def randomization_check(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    layer_name: str,
    cams: np.ndarray,
    seed: int = 0,
) -> float:
    """Rank correlation of the maps with those of a randomly re-initialized copy of the model.

    Adebayo et al. 2018: a map that barely changes when the learned weights are destroyed shows
    image structure (edges, brightness), not what the model learned. Low is good.
    """
    device = next(model.parameters()).device
    randomized = _reinitialized(copy.deepcopy(model).cpu(), seed).to(device)
    layer = resolve_target_layer(randomized, layer_name)
    return rank_correlation(cams, compute_cams(randomized, inputs, method, layer))


def _reinitialized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and norm statistic redrawn at random, seeded, on a forked RNG.

    Layers go back to their default init, then every kernel and weight matrix is redrawn
    He-normal: PyTorch's default init shrinks the signal at each layer, and a deep net built
    from it gives the same output for every image and maps of numerical noise, which would pass
    the check for the wrong reason. Other parameters without a default init get N(0, 0.02).
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        reset: set[int] = set()
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                reset.update(id(p) for p in module.parameters(recurse=False))
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                nn.init.kaiming_normal_(parameter, nonlinearity="relu")
            elif id(parameter) not in reset:
                nn.init.normal_(parameter, std=0.02)
    return model
