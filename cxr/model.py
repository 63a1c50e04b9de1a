"""The classifier: a timm network with one pneumonia logit, and the file it is saved in.

The saved file holds everything inference needs (architecture, input size, resize mode,
normalization, class names), so a model loads and predicts without params.yaml.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import timm
import torch
from pydantic import Field
from torch import nn

from cxr.atomic import atomic_path, sha256_of
from cxr.classes import CLASSES
from cxr.params import ParamsError, Section


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


class ModelParams(Section):
    arch: str  # any timm architecture name
    pretrained: str  # none | imagenet | efficientnet-lite0|1|2 | a file (cxr/pretrained.py)
    pretrained_sha256: str  # pins a weights file given by path; "" = not checked
    normalize: Literal["dataset", "backbone"]  # whose input statistics (input_statistics)
    drop_rate: Annotated[float, Field(ge=0, le=0.9)]


@dataclass(frozen=True)
class ModelCard:
    """What a saved model needs to turn a new X-ray file into a probability."""

    arch: str
    image_size: int
    # How the pixels were made: cxr.images' ResizeMode and Intensity, as load_square takes them.
    resize: str
    mean: float
    std: float
    intensity: str = "raw"
    class_names: tuple[str, ...] = CLASSES
    mlflow_run_id: str = ""
    # The weights training started from (models/pretrained.safetensors, made by the pretrained
    # stage): their source as params.yaml named it, the sha256 of the converted file train
    # loaded and of the original file it came from. Defaults keep older model files loading.
    pretrained: str = "none"
    pretrained_sha256: str = ""
    pretrained_source_sha256: str = ""


# models/pretrained.safetensors: the converted weights (timm names, 1 input channel, no head)
# and one metadata entry, a JSON object: safetensors writes several metadata entries in a
# process-dependent order, and the file's bytes must depend on its content alone, because DVC
# addresses the train stage's input by them.
PRETRAINED_METADATA = "cxr.pretrained"


@dataclass(frozen=True)
class PretrainedWeights:
    """What the pretrained stage made: the weights and where they came from."""

    state_dict: dict[str, torch.Tensor]
    source: str  # as params.yaml names it: none, imagenet, efficientnet-lite0, a path
    arch: str  # the timm architecture they were converted for; "" for none
    source_sha256: str = ""  # of the original file, where there is one
    sha256: str = ""  # of the converted file, filled in when it is read

    @property
    def empty(self) -> bool:
        return not self.state_dict


def save_pretrained(path: Path, weights: PretrainedWeights) -> None:
    from safetensors.torch import save_file

    info = {"source": weights.source, "arch": weights.arch, "source_sha256": weights.source_sha256}
    state = {k: v.detach().cpu().contiguous() for k, v in weights.state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={PRETRAINED_METADATA: json.dumps(info, sort_keys=True)})


def read_pretrained(path: Path) -> PretrainedWeights:
    """The pretrained stage's output, with the sha256 of its bytes (the content DVC tracks)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            info = json.loads((handle.metadata() or {})[PRETRAINED_METADATA])
        state = load_file(str(path))
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise ParamsError(
            f"{path} is not the pretrained stage's output ({err}); run `dvc repro pretrained`"
        ) from None
    return PretrainedWeights(
        state, info["source"], info["arch"], info.get("source_sha256", ""), sha256_of(path)
    )


def load_pretrained(model: nn.Module, arch: str, weights: PretrainedWeights) -> None:
    """Start `model` from the pretrained weights: every weight but the new head must fit."""
    if weights.empty:
        return
    if weights.arch != arch:
        raise ParamsError(
            f"model.arch: the pretrained weights were converted for {weights.arch}, not {arch}; "
            "run `dvc repro pretrained` (or `python -m stages.pretrained ...`) first"
        )
    missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
    head = {f"{name}.{p}" for name in _classifier_names(model) for p in ("weight", "bias")}
    misfits = sorted(
        {k for k in missing if k not in head and not k.endswith("num_batches_tracked")}
        | set(unexpected)
    )
    if misfits:
        raise ParamsError(
            f"model.pretrained: {len(misfits)} weights of {arch} missing or unexpected in the "
            f"pretrained weights ({', '.join(misfits[:3])}); run `dvc repro pretrained`"
        )


def input_statistics(
    normalize: str, arch: str, dataset_mean: float, dataset_std: float
) -> tuple[float, float]:
    """The (mean, std) that normalize the network's 1-channel input.

    `dataset`: the training images' own statistics (inputs of mean 0 and std 1), the right
    choice for a network trained from scratch. `backbone`: the statistics the pretrained
    weights were trained with, averaged over RGB because the stem's RGB filters are summed into
    one grayscale channel (a gray image normalized this way gives the summed stem exactly what
    the RGB stem saw). TF-ported EfficientNet-Lite weights expect (x - 0.5) / 0.5; timm's
    ImageNet models mostly the ImageNet mean and std (about 0.449 and 0.226).
    """
    if normalize == "dataset":
        return dataset_mean, dataset_std
    cfg = timm.get_pretrained_cfg(arch)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else ((0.5,) * 3, (0.5,) * 3)
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def save_model(path: Path, model: nn.Module, card: ModelCard) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"card": asdict(card), "state_dict": state}, tmp)


def normalize(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The network's input from pixel values on the uint8 scale (uint8, or floats from 0 to
    255), of any shape, on any device: (pixels / 255 - mean) / std, with the card's mean and
    std (on the [0, 1] scale).

    The one normalization: training, the PyTorch classifier and the exported ONNX graph all
    call it, so a model never sees at inference an input scaled unlike its training batches.
    """
    return (pixels.float() / 255.0 - mean) / std
