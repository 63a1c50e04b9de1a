"""Typed, validated access to params.yaml.

`dvc exp run -S lr=1e-5` writes YAML 1.2 spellings such as `1e-05`, which PyYAML (YAML 1.1)
reads back as the *string* "1e-05". pydantic's lax mode turns such strings into the declared
type, and every key is checked before a stage does any work: an unknown key, a missing key, a
wrong type or an out-of-range value stops the run with a message naming the key.

Two kinds of settings live in the file. The sections a stage declares in dvc.yaml change what
it computes. `runtime` and `mlflow` only change how or where the work runs (device, threads,
resume, tracking server): no stage declares them, so changing them never makes a stage stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")
# Sections that do not change any result; tests/test_contracts.py keeps them out of dvc.yaml.
RUN_ONLY_SECTIONS = ("runtime", "mlflow")

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


class ParamsError(ValueError):
    """A missing, unknown or invalid entry in params.yaml."""


class Section(BaseModel):
    # Lax parsing ("1e-05" -> 1e-05, "false" -> False), no unknown keys, no mutation.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class DataParams(Section):
    source: Literal["demo", "kaggle", "url", "local"]
    demo_patients: Annotated[int, Field(ge=8)]
    demo_seed: Count
    demo_min_side: Annotated[int, Field(ge=32)]
    demo_max_side: Annotated[int, Field(ge=32)]
    local_path: str
    url: str
    url_sha256: str
    kaggle_dataset: str


class SplitParams(Section):
    val_fraction: Annotated[float, Field(gt=0, le=0.5)]
    seed: Count
    drop_test_patient_overlap: bool


class PreprocessParams(Section):
    resize: Literal["pad", "crop", "stretch"]
    intensity: Literal["raw", "equalize"]


class ModelParams(Section):
    arch: str
    pretrained: str  # none | imagenet | efficientnet-lite0|1|2 | a file (cxr/pretrained.py)
    pretrained_sha256: str  # pins a weights file given by path; "" = not checked
    normalize: Literal["dataset", "backbone"]  # whose input statistics (cxr.model)
    drop_rate: Annotated[float, Field(ge=0, le=0.9)]


class AugmentParams(Section):
    rotation_deg: Annotated[float, Field(ge=0, le=45)]
    zoom: Annotated[float, Field(ge=0, le=0.5)]
    translate: Annotated[float, Field(ge=0, le=0.3)]
    hflip: bool
    brightness: Annotated[float, Field(ge=0, le=0.5)]
    contrast: Annotated[float, Field(ge=0, le=0.5)]


class TrainParams(Section):
    freeze_epochs: Count
    head_lr: NonNegative  # the frozen epochs' constant learning rate; 0 = lr
    backbone_lr_scale: Annotated[float, Field(gt=0, le=1)]  # backbone lr = lr * this
    unfreeze: Literal["all", "progressive"]
    warmup_epochs: Count
    min_lr: NonNegative
    weight_decay: NonNegative
    imbalance: Literal["pos_weight", "sampler", "none"]
    patience: Annotated[int, Field(ge=1)]
    monitor: Literal["auc", "loss"]
    label_smoothing: Annotated[float, Field(ge=0, le=0.4)]
    ema_decay: Annotated[float, Field(ge=0, lt=1)]
    sync_batchnorm: bool
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    augment: AugmentParams


class EvaluateParams(Section):
    flip_tta: bool
    calibration: Literal["temperature", "none"]
    threshold: Literal["fixed", "youden", "youden_middle", "sensitivity"]
    youden_tolerance: Annotated[float, Field(ge=0, le=0.5)]
    fixed_threshold: Annotated[float, Field(ge=0, le=1)]
    target_sensitivity: Annotated[float, Field(gt=0, le=1)]
    bootstrap: Count
    calibration_bins: Annotated[int, Field(ge=2)]


class GradcamParams(Section):
    method: Literal["gradcam", "gradcam++", "hirescam", "eigencam", "xgradcam", "layercam"]
    target_layer: str
    per_outcome: Annotated[int, Field(ge=1)]
    score_images: Annotated[int, Field(ge=2)]


class GuardParams(Section):
    quantile: Annotated[float, Field(ge=0.5, lt=1)]
    ood_images: Annotated[int, Field(ge=2)]


class ExportParams(Section):
    opset: Annotated[int, Field(ge=18)]  # the oldest opset torch's ONNX exporter targets
    tolerance: Annotated[float, Field(gt=0)]


class RuntimeParams(Section):
    device: Literal["auto", "cuda", "mps", "cpu"]
    channels_last: bool
    compile: bool
    threads: Count
    workers: Count
    resume: bool
    processes: Annotated[int, Field(ge=1)]
    memory_budget_gb: NonNegative


class MlflowParams(Section):
    experiment: str
    tracking_uri: str
    registered_model: Annotated[str, Field(min_length=1)]


class Params(Section):
    seed: Count
    image_size: Annotated[int, Field(ge=16, le=1024)]
    lr: Annotated[float, Field(gt=0, le=1)]
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    data: DataParams
    split: SplitParams
    preprocess: PreprocessParams
    model: ModelParams
    train: TrainParams
    guard: GuardParams
    evaluate: EvaluateParams
    gradcam: GradcamParams
    export: ExportParams
    runtime: RuntimeParams
    mlflow: MlflowParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.data.demo_min_side > self.data.demo_max_side:
            raise ValueError("data.demo_min_side must not exceed data.demo_max_side")
        if self.train.freeze_epochs > self.epochs:
            raise ValueError("train.freeze_epochs must not exceed epochs")
        if self.runtime.processes > self.batch_size:
            raise ValueError("runtime.processes must not exceed batch_size (each takes rows)")
        if self.data.source == "url" and not (self.data.url and self.data.url_sha256):
            raise ValueError("data.source=url needs data.url and data.url_sha256")
        return self


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming every offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: " + "; ".join(map(_describe, err.errors()))) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing key"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across keys: the message names them
        return message
    return f"{key}: {message}, got {error['input']!r}"


def as_flat_dict(params: BaseModel) -> dict[str, Any]:
    """`train.augment.hflip`-style keys, as MLflow and people read them."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = value

    walk(params.model_dump(), "")
    return flat
