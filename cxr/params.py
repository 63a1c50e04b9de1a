"""Typed, validated access to params.yaml: the loader, and the settings every stage shares.

`dvc exp run -S lr=1e-5` writes YAML 1.2 spellings such as `1e-05`, which PyYAML (YAML 1.1)
reads back as the *string* "1e-05". pydantic's lax mode turns such strings into the declared
type; an unknown key, a missing key, a wrong type or an out-of-range value stops the run with
a message naming the key.

Each section's schema lives beside the code it configures (`DataParams` in `cxr.sources`,
`TrainParams` in `cxr.training`, ...) and each stage states the sections it reads in a
`StageParams` of its own, so a stage's code deps in dvc.yaml hold only the schemas it reads:
adding a Grad-CAM option does not make DVC retrain the network. The `validate` stage, first in
the pipeline, checks the whole file (every key known, every value valid) before any stage
works.

Two kinds of settings live in the file. The sections a stage declares in dvc.yaml change what
it computes. `runtime` and `mlflow` only change how or where the work runs (device, threads,
resume, tracking server): no stage declares them, so changing them never makes a stage stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS_FILE = Path("params.yaml")
# Sections that do not change any result; tests/test_contracts.py keeps them out of dvc.yaml.
RUN_ONLY_SECTIONS = ("runtime", "mlflow")

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
# The top-level knobs, read by several stages (`dvc exp run -S lr=1e-5` works as typed).
Seed = Count
ImageSize = Annotated[int, Field(ge=16, le=1024)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Epochs = Annotated[int, Field(ge=1)]
BatchSize = Annotated[int, Field(ge=1)]


class ParamsError(ValueError):
    """A missing, unknown or invalid entry in params.yaml."""


class Section(BaseModel):
    # Lax parsing ("1e-05" -> 1e-05, "false" -> False), no unknown keys, no mutation.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


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


class StageParams(Section):
    """The settings one stage reads: its sections in full (unknown keys inside them are
    errors), other stages' sections ignored (the validate stage checks those)."""

    model_config = ConfigDict(extra="ignore")
    runtime: RuntimeParams
    mlflow: MlflowParams


Schema = TypeVar("Schema", bound=BaseModel)


def load_params(schema: type[Schema], path: Path | str = PARAMS_FILE) -> Schema:
    """Read params.yaml and validate it against `schema`; raise ParamsError naming every
    offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: " + "; ".join(map(_describe, err.errors()))) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing key"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across keys names them
        return message
    if isinstance(error["input"], dict):  # a section or an entry: its name, not its content
        return f"{key}: {message}"
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
