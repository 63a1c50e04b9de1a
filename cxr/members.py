"""Ensemble members: networks trained like the train stage's, each with its own architecture,
weights, seed and schedule, and the `train` section shared.

Each entry of params.yaml's `members` is one `member@<name>` stage (dvc.yaml's foreach), cached
and logged to MLflow on its own; the ensemble stage scores their mean and hands it to train as
the teacher. A member declares only its own entry and the shared settings it inherits, so
`dvc exp run -S lr=1e-5` (the deployed network's learning rate) retrains no member, and
`-S members.lite0.seed=2` retrains that member alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from cxr.model import ModelParams
from cxr.params import (
    BatchSize,
    Count,
    Epochs,
    LearningRate,
    NonNegative,
    ParamsError,
    Section,
    Seed,
    StageParams,
)
from cxr.training import Params as TrainingParams
from cxr.training import TrainParams


class MemberParams(Section):
    """What differs between members; every other training setting comes from `train`."""

    arch: str  # any timm architecture name
    pretrained: str = "none"  # as model.pretrained; a file path must be pinned by its sha256
    pretrained_sha256: str = ""
    normalize: Literal["dataset", "backbone"] = "dataset"
    seed: Seed
    lr: LearningRate
    epochs: Epochs
    freeze_epochs: Count = 0
    head_lr: NonNegative = 0
    unfreeze: Literal["all", "progressive"] = "all"
    backbone_lr_scale: Annotated[float, Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _consistent(self) -> MemberParams:
        if self.freeze_epochs > self.epochs:
            raise ValueError("a member's freeze_epochs must not exceed its epochs")
        return self


# Names become stage names (member@name) and file names: letters, digits, - and _.
MemberName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Members = Annotated[dict[MemberName, MemberParams], Field(min_length=1)]


class Params(StageParams):
    """What a member stage reads: the shared training settings and the members."""

    batch_size: BatchSize
    model: ModelParams
    train: TrainParams
    members: Members


def member(params: Params, name: str) -> MemberParams:
    if name not in params.members:
        known = ", ".join(params.members)
        raise ParamsError(f"members.{name}: no such member in params.yaml (members: {known})")
    return params.members[name]


def training_params(params: Params, name: str) -> TrainingParams:
    """The member as the train stage's settings: its own network and schedule, the shared rest.

    Settings are read one by one (`settings`), not dumped, so that what a member inherits is
    visible to whoever watches the reads (tests/test_contracts.py checks them against dvc.yaml).
    """
    own = member(params, name)
    train = settings(params.train, TrainParams)
    keep = ("freeze_epochs", "head_lr", "unfreeze", "backbone_lr_scale")
    train |= {key: getattr(own, key) for key in keep}
    model = {
        "arch": own.arch,
        "pretrained": own.pretrained,
        "pretrained_sha256": own.pretrained_sha256,
        "normalize": own.normalize,
        "drop_rate": params.model.drop_rate,
    }
    return TrainingParams.model_validate(
        {
            "seed": own.seed,
            "lr": own.lr,
            "epochs": own.epochs,
            "batch_size": params.batch_size,
            "model": model,
            "train": train,
            "runtime": params.runtime.model_dump(),
            "mlflow": params.mlflow.model_dump(),
        }
    )


def settings(section: Any, schema: type[BaseModel]) -> dict[str, Any]:
    """A section as a dict, each setting read by name (nested sections too)."""
    values = {}
    for name, field in schema.model_fields.items():
        value = getattr(section, name)
        nested = field.annotation
        is_section = isinstance(nested, type) and issubclass(nested, BaseModel)
        values[name] = settings(value, nested) if is_section else value
    return values
