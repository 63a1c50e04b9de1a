"""Train the deployed network (timm, DenseNet121 by default) on the preprocessed arrays; record
the run in MLflow.

Training starts from the pretrained stage's weights file (empty for `model.pretrained: none`);
its sha256 goes into the model card and the MLflow run, so a model names the weights it grew
from, and DVC re-runs training when their content changes.

With `distill.teacher` other than none, the network learns from the ensemble stage's teacher
logits on the training images as well as from the labels (`cxr.distill.DistillationLoss`);
data/teacher.csv is always a dependency, and holds no rows when there is no teacher, so the
members change nothing here then.

The loop, checkpoints and outputs are `cxr.trainer.train_model`, which the member stage uses
too: it keeps the best epoch by `train.monitor` on validation and resumes an interrupted run
from checkpoints/train.pt when `runtime.resume` is true. With `runtime.processes` > 1 the stage
starts itself again under torchrun, one process per device, and trains data-parallel; rank 0
writes every output.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
import torch

from cxr import distributed
from cxr.atomic import sha256_of
from cxr.device import pick_device
from cxr.distill import DistillationLoss, DistillParams
from cxr.model import read_pretrained
from cxr.params import load_params
from cxr.processed import ProcessedSplit, load_split
from cxr.stage import StageError, paths, require, run
from cxr.trainer import SoftTargets, train_model
from cxr.training import Params as TrainingParams
from cxr.training import check_processes


class Params(TrainingParams):
    """What the train stage reads: a network's training settings and how it distills."""

    distill: DistillParams


def read_teacher(path: Path, settings: DistillParams, train: ProcessedSplit) -> SoftTargets | None:
    """The ensemble stage's teacher logits, checked to be those of this training split, and
    the loss that distills them."""
    if settings.teacher == "none":
        return None
    table = pd.read_csv(path, keep_default_na=False)
    if not table["path"].equals(train.index["path"]):
        raise StageError(
            f"{path} holds {len(table)} teacher logits that do not follow the training split's "
            f"{len(train.labels)} images in order; run `dvc repro` to score them again"
        )
    return SoftTargets(
        logits=torch.tensor(table["logit"].to_numpy(), dtype=torch.float32),
        sha256=sha256_of(path),
        loss=partial(DistillationLoss, temperature=settings.temperature, weight=settings.weight),
        about=f"distilled from the teacher (distill.teacher: {settings.teacher}, temperature "
        f"{settings.temperature}, weight {settings.weight})",
    )


def main(argv: list[str] | None = None) -> None:
    args = paths(
        __doc__, "processed", "pretrained", "teacher", "model", "metrics", "plots", argv=argv
    )
    params = load_params(Params)
    require(args.processed, args.pretrained, args.teacher)
    device = pick_device(params.runtime.device)
    if params.runtime.processes > 1 and not distributed.launched_by_torchrun():
        check_processes(params, device)
        stage_args = [str(path) for path in vars(args).values()]
        distributed.relaunch(params.runtime.processes, "stages.train", stage_args)
    ranks, device = distributed.start(device)
    try:
        weights = read_pretrained(args.pretrained)
        teacher = read_teacher(args.teacher, params.distill, load_split("train", args.processed))
        train_model(args, params, ranks, device, weights, "train", teacher)
    finally:
        distributed.stop()


if __name__ == "__main__":
    run(main)
