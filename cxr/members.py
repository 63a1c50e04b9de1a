"""Ensemble members: networks trained like the train stage's, each with its own architecture,
weights, seed and schedule, and the `train` section shared.

Each entry of params.yaml's `members` is one `member@<name>` stage (dvc.yaml's foreach,
stages/member.py), cached and logged to MLflow on its own; the ensemble stage scores them and
their mean and hands the teacher to train. This module is the schema alone, so the ensemble
stage, which only reads the names, does not depend on the training code. A member declares
only its own entry and the shared settings it inherits, so `dvc exp run -S lr=1e-5` (the
deployed network's learning rate) retrains no member, and `-S members.lite0.seed=2` retrains
that member alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from cxr.params import Count, Epochs, LearningRate, NonNegative, Section, Seed


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
    # train.precision's choices, or "train" to inherit it. Speed in a format depends on the
    # network and the CPU: on one 2-core machine bf16 sped DenseNet121's training step up 2x,
    # on another (AVX2 only) it slowed EfficientNet-Lite0's down 13x (docs/speed.md).
    precision: Literal["train", "auto", "bf16", "fp16", "fp32"] = "train"

    @model_validator(mode="after")
    def _consistent(self) -> MemberParams:
        if self.freeze_epochs > self.epochs:
            raise ValueError("a member's freeze_epochs must not exceed its epochs")
        return self


# Names become stage names (member@name) and file names: letters, digits, - and _.
MemberName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Members = Annotated[dict[MemberName, MemberParams], Field(min_length=1)]
