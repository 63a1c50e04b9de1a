"""Typed, validated access to params.yaml.

`dvc exp run -S lr=1e-5` rewrites params.yaml with YAML 1.2 spellings such as `1e-05`, which
PyYAML (YAML 1.1) reads back as the *string* "1e-05". Every value is therefore coerced to the
type declared below, and every key is checked, before a stage does any work: a typo or an
out-of-range value stops the run with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A missing, unknown or invalid entry in params.yaml."""


def _range(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
):
    return {"low": low, "high": high, "open_low": open_low, "open_high": open_high}


@dataclass(frozen=True)
class DataParams:
    source: Literal["demo", "kaggle", "url", "local"]
    demo_patients: int = field(metadata=_range(8))
    demo_seed: int = field(metadata=_range(0))
    demo_min_side: int = field(metadata=_range(32))
    demo_max_side: int = field(metadata=_range(32))
    local_path: str
    url: str
    url_sha256: str
    kaggle_dataset: str


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = field(metadata=_range(0.0, 0.5, open_low=True))
    seed: int = field(metadata=_range(0))
    drop_test_patient_overlap: bool


@dataclass(frozen=True)
class PreprocessParams:
    resize: Literal["pad", "crop", "stretch"]
    workers: int = field(metadata=_range(0))


@dataclass(frozen=True)
class ModelParams:
    arch: str
    pretrained: str
    drop_rate: float = field(metadata=_range(0.0, 0.9))


@dataclass(frozen=True)
class AugmentParams:
    rotation_deg: float = field(metadata=_range(0.0, 45.0))
    zoom: float = field(metadata=_range(0.0, 0.5))
    translate: float = field(metadata=_range(0.0, 0.3))
    hflip: bool
    brightness: float = field(metadata=_range(0.0, 0.5))
    contrast: float = field(metadata=_range(0.0, 0.5))


@dataclass(frozen=True)
class TrainParams:
    freeze_epochs: int = field(metadata=_range(0))
    min_lr: float = field(metadata=_range(0.0))
    weight_decay: float = field(metadata=_range(0.0))
    imbalance: Literal["pos_weight", "sampler", "none"]
    patience: int = field(metadata=_range(1))
    label_smoothing: float = field(metadata=_range(0.0, 0.4))
    ema_decay: float = field(metadata=_range(0.0, 1.0, open_high=True))
    augment: AugmentParams
    device: Literal["auto", "cuda", "mps", "cpu"]
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    channels_last: bool
    compile: bool
    threads: int = field(metadata=_range(0))
    resume: bool


@dataclass(frozen=True)
class EvaluateParams:
    flip_tta: bool
    threshold: Literal["fixed", "youden", "sensitivity"]
    fixed_threshold: float = field(metadata=_range(0.0, 1.0))
    target_sensitivity: float = field(metadata=_range(0.0, 1.0, open_low=True))
    bootstrap: int = field(metadata=_range(0))
    calibration_bins: int = field(metadata=_range(2))


@dataclass(frozen=True)
class GradcamParams:
    method: Literal["gradcam", "gradcam++", "hirescam", "eigencam", "xgradcam", "layercam"]
    target_layer: str
    per_outcome: int = field(metadata=_range(1))
    score_images: int = field(metadata=_range(1))


@dataclass(frozen=True)
class MlflowParams:
    experiment: str
    tracking_uri: str


@dataclass(frozen=True)
class Params:
    seed: int = field(metadata=_range(0))
    image_size: int = field(metadata=_range(16, 1024))
    lr: float = field(metadata=_range(0.0, 1.0, open_low=True))
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    data: DataParams
    split: SplitParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    gradcam: GradcamParams
    mlflow: MlflowParams

    def __post_init__(self) -> None:
        if self.data.demo_min_side > self.data.demo_max_side:
            raise ParamsError("data.demo_min_side must not exceed data.demo_max_side")
        if self.train.freeze_epochs > self.epochs:
            raise ParamsError("train.freeze_epochs must not exceed epochs")
        if self.data.source == "url" and not (self.data.url and self.data.url_sha256):
            raise ParamsError("data.source=url needs data.url and data.url_sha256")


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read, coerce and validate params.yaml; raise ParamsError naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    return _build(Params, raw, prefix="")


def as_flat_dict(params: Params) -> dict[str, Any]:
    """`train.augment.hflip`-style keys, as MLflow and people read them."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                flat[f"{prefix}{f.name}"] = value

    walk(params, "")
    return flat


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ParamsError(f"unknown key(s) in params.yaml: {names}")
    missing = sorted(set(fields) - set(raw))
    if missing:
        names = ", ".join(f"{prefix}{k}" for k in missing)
        raise ParamsError(f"missing key(s) in params.yaml: {names}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value)
            _check_range(key, values[name], fields[name].metadata)
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    name = hint.__name__ if isinstance(hint, type) else str(hint)
    raise ParamsError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _check_range(key: str, value: Any, bounds: types.MappingProxyType) -> None:
    if not bounds:
        return
    low, high = bounds["low"], bounds["high"]
    if low is not None and (value < low or (bounds["open_low"] and value == low)):
        op = ">" if bounds["open_low"] else ">="
        raise ParamsError(f"{key}: {value!r} is out of range (must be {op} {low})")
    if high is not None and (value > high or (bounds["open_high"] and value == high)):
        op = "<" if bounds["open_high"] else "<="
        raise ParamsError(f"{key}: {value!r} is out of range (must be {op} {high})")
