"""The classifier: a timm network with one pneumonia logit, and the file it is saved in.

The saved file holds everything inference needs (architecture, input size, resize mode,
normalization, class names), so a model loads and predicts without params.yaml.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from cxr.atomic import atomic_path
from cxr.dataset import CLASSES
from cxr.images import Intensity, ResizeMode
from cxr.params import ParamsError


def create_model(arch: str, pretrained: str, drop_rate: float = 0.0) -> nn.Module:
    """A 1-channel, 1-logit timm model.

    `pretrained` is "none", "imagenet" (timm's hub weights) or a local weights file. A local
    file goes through timm's own pretrained loading, so its filtering applies: the RGB stem is
    summed into one grayscale channel and the 1000-class ImageNet head is dropped.
    """
    options = {"num_classes": 1, "in_chans": 1, "drop_rate": drop_rate}
    if not timm.is_model(arch):
        raise ParamsError(f"model.arch: unknown timm architecture {arch!r}")
    if pretrained == "none":
        return timm.create_model(arch, pretrained=False, **options)
    if pretrained == "imagenet":
        return timm.create_model(arch, pretrained=True, **options)
    weights = Path(pretrained)
    if not weights.is_file():
        raise ParamsError(f"model.pretrained: weights file {weights} not found")
    # timm loads adapted weights non-strictly and only logs what did not fit; treat that as an
    # error, except for the classifier head, which is replaced by design.
    report, timm_logger = _KeyReport(), logging.getLogger("timm.models._builder")
    level = timm_logger.level
    timm_logger.setLevel(logging.INFO)  # missing keys are reported at INFO level
    timm_logger.addHandler(report)
    try:
        model = timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **options
        )
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ParamsError(
            f"model.pretrained: {weights} does not fit {arch}: {first_line}"
        ) from None
    finally:
        timm_logger.removeHandler(report)
        timm_logger.setLevel(level)
    head = {f"{name}.{p}" for name in _classifier_names(model) for p in ("weight", "bias")}
    misfits = sorted(set(report.keys) - head)
    if misfits:
        listed = ", ".join(misfits[:3]) + (", ..." if len(misfits) > 3 else "")
        raise ParamsError(
            f"model.pretrained: {weights} does not fit {arch}: {len(misfits)} weights missing or "
            f"unexpected ({listed})"
        )
    return model


class _KeyReport(logging.Handler):
    """Collects the state-dict keys timm reports as missing or unexpected while loading."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"(?:Missing|Unexpected) keys \((.*?)\)", record.getMessage())
        if match:
            self.keys += match.group(1).split(", ")


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


@dataclass(frozen=True)
class ModelCard:
    """What a saved model needs to turn a new X-ray file into a probability."""

    arch: str
    image_size: int
    resize: ResizeMode
    mean: float
    std: float
    intensity: Intensity = "raw"
    class_names: tuple[str, ...] = CLASSES
    mlflow_run_id: str = ""


def save_model(path: Path, model: nn.Module, card: ModelCard) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"card": asdict(card), "state_dict": state}, tmp)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, H, W) on any device to normalized float (N, 1, H, W)."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)
