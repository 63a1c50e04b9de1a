"""Train the timm classifier on the preprocessed arrays; record the run in MLflow.

Training starts from the pretrained stage's weights file (empty for `model.pretrained: none`);
its sha256 goes into the model card and the MLflow run, so a model names the weights it grew
from, and DVC re-runs training when their content changes.

Keeps the best validation-AUC epoch. An interrupted run resumes from checkpoints/train.pt when
`runtime.resume` is true. With `runtime.processes` > 1 the stage starts itself again under
torchrun, one process per device, and trains data-parallel; rank 0 writes every output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from timm.layers import convert_sync_batchnorm
from torch import nn

from cxr import distributed, tracking
from cxr.atomic import write_csv, write_json
from cxr.device import (
    autocast_dtype,
    memory_budget,
    memory_format,
    pick_device,
    use_cpu_threads,
)
from cxr.distributed import Ranks
from cxr.figures import save_history_figure
from cxr.model import (
    ModelCard,
    PretrainedWeights,
    create_model,
    input_statistics,
    load_pretrained,
    read_pretrained,
    save_model,
)
from cxr.params import RUN_ONLY_SECTIONS, Params, ParamsError, as_flat_dict, load_params
from cxr.processed import ProcessedSplit, load_split, load_stats
from cxr.stage import StageError, paths, require, run
from cxr.training import (
    DeviceData,
    Numerics,
    StreamedData,
    TrainingData,
    checkpoint,
    create_run,
    fit,
    new_progress,
    restore,
    save_checkpoint,
    steps_per_epoch,
)

CHECKPOINT = Path("checkpoints/train.pt")


def fingerprint(params: Params, processed: Path, pretrained_sha256: str = "") -> str:
    """Identifies the training inputs, so a checkpoint is resumed only by the run it came from."""
    relevant = {
        k: v for k, v in as_flat_dict(params).items() if k.split(".")[0] not in RUN_ONLY_SECTIONS
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for name in ("index.csv", "stats.json"):
        digest.update((processed / name).read_bytes())
    digest.update(pretrained_sha256.encode())
    return digest.hexdigest()


def load_resumable(params: Params, fingerprint_now: str) -> dict | None:
    """The checkpoint an interrupted run of these inputs left, if resuming is on.

    A checkpoint holds tensors and plain data only (`cxr.training.checkpoint`), so it is loaded
    with `weights_only`: a file holding anything else, which unpickling would run as code, is
    refused instead of executed.
    """
    if not (params.runtime.resume and CHECKPOINT.is_file()):
        return None
    try:
        saved = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise StageError(
            f"{CHECKPOINT} holds more than tensors and plain data ({reason}): not loaded; "
            "delete it to train afresh"
        ) from None
    if saved.get("fingerprint") != fingerprint_now:
        print(f"{CHECKPOINT} comes from other params or data: starting afresh")
        return None
    return saved


def summarize(progress: dict, history: pd.DataFrame, wall_time: float) -> dict:
    """metrics/train.json: small and flat, to read in `dvc metrics diff`."""
    best = history.loc[history["epoch"] == progress["best_epoch"]].iloc[0]
    return {
        "best_epoch": int(progress["best_epoch"]),
        "best_val_auc": round(float(best["val_auc"]), 5),
        "best_val_loss": round(float(best["val_loss"]), 5),
        "epochs_run": int(progress["epoch"]),
        "wall_time_s": round(wall_time, 1),
        "train_images_per_s": round(float(history["images_per_s"].mean()), 1),
    }


def log_model_to_mlflow(model: nn.Module, image_size: int) -> None:
    """The best model as an MLflow PyTorch model, with its input/output signature."""
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    example = np.zeros((1, 1, image_size, image_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
    )


def pretrained_record(weights: PretrainedWeights) -> dict[str, str]:
    """The weights training started from, as MLflow params and tags: the converted file's
    sha256 (`sha256sum models/pretrained.safetensors`) and the original file's."""
    if weights.empty:
        return {"pretrained.source": "none"}
    return {
        "pretrained.source": weights.source,
        "pretrained.sha256": weights.sha256,
        "pretrained.source_sha256": weights.source_sha256,
    }


def check_both_classes(name: str, labels: np.ndarray, index: pd.DataFrame) -> None:
    if len(np.unique(labels)) < 2:
        raise StageError(
            f"the {name} split holds only one class ({index['label'].iloc[0]}); ROC-AUC and "
            "early stopping need both: use more data or a larger split.val_fraction"
        )


def place_data(
    splits: list[ProcessedSplit], budget: int, device: torch.device
) -> tuple[list[TrainingData], str]:
    """On the device if the splits fit in the memory budget, else streamed from the arrays."""
    size = sum(split.images.nbytes for split in splits)
    kind = DeviceData if size <= budget else StreamedData
    how = "held on" if kind is DeviceData else "streamed to"
    note = f"{size / 1e9:.2f} GB of images {how} {device} (budget {budget / 1e9:.2f} GB)"
    return [kind.from_arrays(split.images, split.labels, device) for split in splits], note


def prepare_model(params: Params, ranks: Ranks, weights: PretrainedWeights) -> nn.Module:
    """The network to train, from the pretrained weights; with several processes, its BatchNorm
    layers synchronized when `train.sync_batchnorm` says so (timm's conversion covers its
    BatchNorm+activation layers)."""
    model = create_model(params.model.arch, "none", params.model.drop_rate)
    load_pretrained(model, params.model.arch, weights)
    if not (ranks.distributed and has_batchnorm(model)):
        return model
    if params.train.sync_batchnorm:
        return convert_sync_batchnorm(model)
    if ranks.main:
        print("BatchNorm not synchronized: each process normalizes its own share of a batch")
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_processes(params: Params, device: torch.device) -> None:
    """Before torchrun starts anything: torch synchronizes BatchNorm on GPUs only."""
    if params.train.sync_batchnorm and device.type != "cuda":
        model = create_model(params.model.arch, "none", params.model.drop_rate)
        if has_batchnorm(model):
            raise ParamsError(
                f"train.sync_batchnorm: synchronized BatchNorm needs CUDA, not {device.type}; "
                f"set it to false to train {params.model.arch} in {params.runtime.processes} "
                "processes with per-process BatchNorm statistics"
            )


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "processed", "pretrained", "model", "metrics", "plots", argv=argv)
    params = load_params()
    require(args.processed, args.pretrained)
    device = pick_device(params.runtime.device)
    if params.runtime.processes > 1 and not distributed.launched_by_torchrun():
        check_processes(params, device)
        stage_args = [str(path) for path in vars(args).values()]
        distributed.relaunch(params.runtime.processes, "stages.train", stage_args)
    ranks, device = distributed.start(device)
    try:
        train_model(args, params, ranks, device)
    finally:
        distributed.stop()


def train_model(
    args: argparse.Namespace, params: Params, ranks: Ranks, device: torch.device
) -> None:
    dtype = autocast_dtype(params.train.precision, device)
    torch.manual_seed(params.seed)
    threads = use_cpu_threads(params.runtime.threads)
    weights = read_pretrained(args.pretrained)
    model = prepare_model(params, ranks, weights)

    stats = load_stats(args.processed)
    train_split, val_split = load_split("train", args.processed), load_split("val", args.processed)
    check_both_classes("train", train_split.labels, train_split.index)
    check_both_classes("val", val_split.labels, val_split.index)
    mean, std = input_statistics(
        params.model.normalize, params.model.arch, stats["mean"], stats["std"]
    )
    numerics = Numerics(device, dtype, memory_format(params.runtime.channels_last), mean, std)
    budget = memory_budget(params.runtime.memory_budget_gb, device)
    (train, val), placement = place_data([train_split, val_split], budget, device)
    steps = steps_per_epoch(len(train.labels), params.batch_size, ranks.world)
    training = create_run(model, params, numerics, steps, params.runtime.compile, ranks)

    positives = int(train_split.labels.sum())
    negatives = len(train_split.labels) - positives
    # Weighting positives by NORMAL/PNEUMONIA makes both classes weigh the same in the loss.
    pos_weight = negatives / positives if params.train.imbalance == "pos_weight" else 1.0
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))

    run_fingerprint = fingerprint(params, args.processed, weights.sha256)
    (saved,) = ranks.from_main(load_resumable(params, run_fingerprint) if ranks.main else None)
    progress = restore(training, saved) if saved else new_progress()
    if not ranks.main:
        fit(training, train, val, params, numerics, loss_fn, progress, lambda _: None)
        return
    where = f"{ranks.world} processes (DDP), " if ranks.distributed else ""
    print(
        f"training {params.model.arch} on {where}{device} ({len(train.labels)} train: "
        f"{negatives} NORMAL / {positives} PNEUMONIA, {len(val.labels)} val), pos_weight "
        f"{pos_weight:.3f}, AdamW lr={training.optimizer.param_groups[0]['initial_lr']!r}"
        + (f", resuming after epoch {progress['epoch']}" if saved else "")
        + (
            f"; from {weights.source} weights (sha256 {weights.sha256[:12]})"
            if not weights.empty
            else ""
        )
        + f"; {placement}"
        + (f"; {threads} CPU threads" if device.type == "cpu" else "")
    )

    experiment_id = tracking.use_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    started = time.perf_counter()
    with mlflow.start_run(
        run_id=saved["mlflow_run_id"] if saved else None, experiment_id=experiment_id
    ) as active:
        if not saved:
            tracking.log_params(as_flat_dict(params))
            tracking.log_params(pretrained_record(weights))
        mlflow.set_tags({**tracking.run_tags(), **pretrained_record(weights), "dvc.stage": "train"})

        def on_epoch_end(progress: dict) -> None:
            record = progress["history"][-1]
            metrics = {k: v for k, v in record.items() if k not in ("epoch", "frozen")}
            mlflow.log_metrics(metrics, step=record["epoch"])
            saved = checkpoint(training, progress)
            saved.update(fingerprint=run_fingerprint, mlflow_run_id=active.info.run_id)
            save_checkpoint(CHECKPOINT, saved)

        progress = fit(training, train, val, params, numerics, loss_fn, progress, on_epoch_end)
        wall_time = time.perf_counter() - started

        # A fresh network takes the kept weights: the saved model has plain BatchNorm layers
        # even when training synchronized them across processes.
        model = create_model(params.model.arch, "none", params.model.drop_rate)
        model.load_state_dict(progress["best_state"])
        card = ModelCard(
            arch=params.model.arch,
            image_size=stats["image_size"],
            resize=stats["resize"],
            intensity=stats["intensity"],
            mean=mean,
            std=std,
            mlflow_run_id=active.info.run_id,
            pretrained=weights.source,
            pretrained_sha256=weights.sha256 if not weights.empty else "",
            pretrained_source_sha256=weights.source_sha256,
        )
        save_model(args.model, model, card)
        history = pd.DataFrame(progress["history"])
        write_csv(args.plots / "history.csv", history)
        save_history_figure(args.plots / "history.png", history)
        summary = summarize(progress, history, wall_time)
        write_json(args.metrics, summary)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(args.plots / "history.png"), artifact_path="plots")
        log_model_to_mlflow(model, stats["image_size"])
    CHECKPOINT.unlink(missing_ok=True)
    print(
        f"best epoch {progress['best_epoch']} by validation {params.train.monitor} -> {args.model}"
    )


if __name__ == "__main__":
    run(main)
