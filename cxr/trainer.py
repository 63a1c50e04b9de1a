"""One network trained end to end: the loop, resumable checkpoints, the MLflow run, the model
file, its history table and chart. The train stage (the deployed network, optionally distilled)
and the member stage (each ensemble member) both train this way.

It lives apart from both stages so that neither stage's own code is a dependency of the other:
an edit to how the train stage distills, or to the train stage's script, does not retrain the
members (tests/test_contracts.py holds the table of which stages each module re-runs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from cxr import tracking
from cxr.atomic import write_csv, write_json, write_png
from cxr.batches import place_data, require_both_classes, steps_per_epoch
from cxr.checkpoint import checkpoint, fingerprint, load_resumable, restore, save_checkpoint
from cxr.device import autocast_dtype, memory_budget, memory_format, use_cpu_threads
from cxr.distributed import Ranks
from cxr.model import ModelCard, PretrainedWeights, create_model, input_statistics, save_model
from cxr.params import as_flat_dict
from cxr.processed import load_split, load_stats
from cxr.training import (
    Numerics,
    create_run,
    fit,
    imbalance_loss,
    new_progress,
    prepare_model,
)
from cxr.training import Params as TrainingParams

CHECKPOINTS = Path("checkpoints")


@dataclass(frozen=True)
class SoftTargets:
    """A logit per training image to learn from beside the labels (a teacher's), and the loss
    that mixes them in; the caller decides how, so this module needs no distillation code."""

    logits: torch.Tensor
    sha256: str  # of the file they came from: part of the run's fingerprint and MLflow tags
    loss: Callable[[nn.Module], nn.Module]  # the labels' loss -> the mixed loss
    about: str  # for the training log line


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


def save_history_figure(path: Path, history: pd.DataFrame) -> None:
    """Loss and validation AUC per epoch, to see at a glance whether training converged."""
    figure = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_auc = figure.subplots(1, 2)
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_auc.plot(history["epoch"], history["val_auc"], marker="o", color="tab:green")
    ax_auc.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation ROC-AUC")
    write_png(path, figure, dpi=100)


def train_model(
    args: argparse.Namespace,
    params: TrainingParams,
    ranks: Ranks,
    device: torch.device,
    weights: PretrainedWeights,
    stage: str,
    teacher: SoftTargets | None = None,
) -> tuple[torch.nn.Module, Numerics] | None:
    """Train `params.model.arch` from `weights` on args.processed (learning from `teacher` as
    well, if given) and write args.model, args.metrics and args.plots; returns the kept network
    and how it reads images (on the main process; None on the others)."""
    dtype = autocast_dtype(params.train.precision, device)
    torch.manual_seed(params.seed)
    threads = use_cpu_threads(params.runtime.threads)
    model = prepare_model(params, ranks, weights)
    checkpoint_file = CHECKPOINTS / f"{stage}.pt"

    stats = load_stats(args.processed)
    train_split, val_split = load_split("train", args.processed), load_split("val", args.processed)
    require_both_classes("train", train_split)
    require_both_classes("val", val_split)
    mean, std = input_statistics(
        params.model.normalize, params.model.arch, stats["mean"], stats["std"]
    )
    numerics = Numerics(device, dtype, memory_format(params.runtime.channels_last), mean, std)
    budget = memory_budget(params.runtime.memory_budget_gb, device)
    (train, val), placement = place_data([train_split, val_split], budget, device)
    steps = steps_per_epoch(len(train.labels), params.batch_size, ranks.world)
    training = create_run(model, params, numerics, steps, params.runtime.compile, ranks)

    loss_fn, pos_weight = imbalance_loss(train_split.labels, params.train.imbalance, device)
    soft = None
    if teacher is not None:
        loss_fn = teacher.loss(loss_fn)
        soft = teacher.logits.to(device)
    positives = int(train_split.labels.sum())
    negatives = len(train_split.labels) - positives

    inputs = (weights.sha256 or weights.source_sha256, teacher.sha256 if teacher else "")
    run_fingerprint = fingerprint(params, args.processed, *inputs)
    (saved,) = ranks.from_main(
        load_resumable(checkpoint_file, params, run_fingerprint) if ranks.main else None
    )
    progress = restore(training, saved) if saved else new_progress()
    if not ranks.main:
        fit(training, train, val, params, numerics, loss_fn, progress, lambda _: None, soft)
        return None
    where = f"{ranks.world} processes (DDP), " if ranks.distributed else ""
    print(
        f"training {params.model.arch} on {where}{device} ({len(train.labels)} train: "
        f"{negatives} NORMAL / {positives} PNEUMONIA, {len(val.labels)} val), pos_weight "
        f"{pos_weight:.3f}, AdamW lr={training.optimizer.param_groups[0]['initial_lr']!r}"
        + (f", resuming after epoch {progress['epoch']}" if saved else "")
        + (
            f"; from {weights.source} weights "
            f"(sha256 {(weights.sha256 or weights.source_sha256)[:12]})"
            if not weights.empty
            else ""
        )
        + (f"; {teacher.about}" if teacher else "")
        + f"; {placement}"
        + (f"; {threads} CPU threads" if device.type == "cpu" else "")
    )

    experiment_id = tracking.use_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    started = time.perf_counter()
    resumed_run = tracking.resumable_run(saved["mlflow_run_id"] if saved else None)
    with mlflow.start_run(run_id=resumed_run, experiment_id=experiment_id) as active:
        if resumed_run is None:
            tracking.log_params(as_flat_dict(params))
            tracking.log_params(pretrained_record(weights))
        mlflow.set_tags({**tracking.run_tags(), **pretrained_record(weights), "dvc.stage": stage})
        if teacher:
            mlflow.set_tag("teacher.sha256", teacher.sha256)
        if saved and resumed_run is None:
            mlflow.set_tag("resumed_from_run_id", saved["mlflow_run_id"])

        def on_epoch_end(progress: dict) -> None:
            record = progress["history"][-1]
            metrics = {k: v for k, v in record.items() if k not in ("epoch", "frozen")}
            mlflow.log_metrics(metrics, step=record["epoch"])
            saved = checkpoint(training, progress)
            saved.update(fingerprint=run_fingerprint, mlflow_run_id=active.info.run_id)
            save_checkpoint(checkpoint_file, saved)

        progress = fit(
            training, train, val, params, numerics, loss_fn, progress, on_epoch_end, soft
        )
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
        tracking.log_pytorch_model(model, stats["image_size"])
    checkpoint_file.unlink(missing_ok=True)
    print(
        f"best epoch {progress['best_epoch']} by validation {params.train.monitor} -> {args.model}"
    )
    return model.to(device, memory_format=numerics.memory_format), numerics
