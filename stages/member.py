"""Train one ensemble member, `members.<name>` of params.yaml, and score every split with it.

dvc.yaml runs this once per member (`member@<name>`, foreach). The member trains as the train
stage's network does (`cxr.trainer.train_model`: same loop, checkpoints, MLflow run, tagged
`dvc.stage: member@<name>`), from its own weights, which it resolves itself: a registry
package's file is checked against the sha256 pinned in cxr/pretrained.py, and a file given by
path must be pinned by `pretrained_sha256`, since a path says nothing about content. Its raw
logits on every image of every split (no augmentation, no calibration) go to a table the
ensemble stage reads.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel

from cxr import distributed
from cxr.atomic import write_csv
from cxr.batches import DeviceData
from cxr.device import pick_device
from cxr.members import MemberParams, Members
from cxr.model import ModelParams
from cxr.params import BatchSize, ParamsError, StageParams, load_params
from cxr.pretrained import PACKAGES, resolve
from cxr.processed import SPLITS, load_split
from cxr.stage import paths, project_root, require, run
from cxr.trainer import train_model
from cxr.training import Params as TrainingParams
from cxr.training import TrainParams, check_processes, predict_logits


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
    if own.precision != "train":
        train["precision"] = own.precision
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


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "name", "processed", "model", "scores", "metrics", "plots", argv=argv)
    name = str(args.name)
    params = training_params(load_params(Params), name)  # as train would read them
    model = params.model
    if model.pretrained not in ("none", "imagenet", *PACKAGES) and not model.pretrained_sha256:
        raise ParamsError(
            f"members.{name}.pretrained_sha256: pin the weights file {model.pretrained!r} by "
            "its sha256 (`sha256sum FILE`): DVC sees the path, not the content"
        )
    try:
        weights = resolve(model.pretrained, model.arch, model.pretrained_sha256, project_root())
    except ParamsError as err:
        raise ParamsError(f"members.{name}: {err}") from None
    require(args.processed)
    device = pick_device(params.runtime.device)
    if params.runtime.processes > 1 and not distributed.launched_by_torchrun():
        check_processes(params, device)
        stage_args = [str(path) for path in vars(args).values()]
        distributed.relaunch(params.runtime.processes, "stages.member", stage_args)
    ranks, device = distributed.start(device)
    try:
        trained = train_model(args, params, ranks, device, weights, f"member@{name}")
    finally:
        distributed.stop()
    if trained is None:  # not the main process
        return
    network, numerics = trained
    tables = []
    for split in SPLITS:
        data = load_split(split, args.processed)
        logits = predict_logits(
            network, DeviceData.from_arrays(data.images, data.labels, device), numerics,
            2 * params.batch_size,
        )  # fmt: skip
        columns = {"split": split, "row": data.index["row"], "path": data.index["path"]}
        tables.append(pd.DataFrame(columns | {"logit": logits.cpu().numpy()}))
    write_csv(args.scores, pd.concat(tables, ignore_index=True))
    print(f"member {name}: logits of every split -> {args.scores}")


if __name__ == "__main__":
    run(main)
