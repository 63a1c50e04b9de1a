"""The training loop, as free functions that take the objects they use: one optimizer step,
one epoch, validation, and `fit`, which runs the epochs, keeps the best one and stops early.

Its pieces live beside it: feeding batches (cxr/batches.py), augmenting them on the device
(cxr/augment.py), what trains when and at what rate (cxr/schedule.py), and the checkpoint an
interrupted run resumes from (cxr/checkpoint.py).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from sklearn.metrics import roc_auc_score
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cxr.augment import AugmentParams, augment
from cxr.batches import TrainingData, batch_order
from cxr.device import grad_scaler
from cxr.distributed import ONE_PROCESS, Ranks
from cxr.model import ModelParams, PretrainedWeights, create_model, load_pretrained, normalize
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
from cxr.schedule import (
    Schedule,
    first_trainable_group,
    layer_groups,
    parameter_groups,
    set_trainable,
)


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


class Params(StageParams):
    """What the train stage reads from params.yaml."""

    seed: Seed
    lr: LearningRate
    epochs: Epochs
    batch_size: BatchSize
    model: ModelParams
    train: TrainParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.train.freeze_epochs > self.epochs:
            raise ValueError("train.freeze_epochs must not exceed epochs")
        if self.runtime.processes > self.batch_size:
            raise ValueError("runtime.processes must not exceed batch_size (each takes rows)")
        return self


@dataclass(frozen=True)
class Numerics:
    """How batches are laid out and computed on the training device, fixed for a run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    memory_format: torch.memory_format
    mean: float  # training-set pixel statistics, on the [0, 1] scale
    std: float

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values (B, 1, H, W) on the uint8 scale to the network's input, normalized as
        every deployed form normalizes (`cxr.model.normalize`) and laid out for the device."""
        return normalize(pixels, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


@dataclass
class Run:
    """What one training run advances step by step; `checkpoint` saves all of it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    ema: AveragedModel | None
    scaler: torch.amp.GradScaler | None
    order_rng: torch.Generator
    augment_rng: torch.Generator
    ranks: Ranks
    compile: bool
    # The model as the training step calls it (wrapped for DDP, compiled), and the first layer
    # group it trains: DDP registers the trainable parameters when it wraps the model, so the
    # model is wrapped again when (progressive) unfreezing changes them.
    forward: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    trainable_from: int = 0

    @property
    def kept_model(self) -> nn.Module:
        """The weights that are validated and kept: the average if there is one."""
        return self.model if self.ema is None else self.ema.module


def create_run(
    model: nn.Module,
    params: Params,
    numerics: Numerics,
    steps_per_epoch: int,
    compile: bool,
    ranks: Ranks = ONE_PROCESS,
) -> Run:
    device = numerics.device
    model.to(device, memory_format=numerics.memory_format)
    train = params.train
    groups = parameter_groups(model, params.lr, train.weight_decay, train.backbone_lr_scale)
    optimizer = create_optimizer_v2(groups, "adamw", lr=params.lr)
    scheduler = Schedule(
        optimizer,
        warmup_steps=train.warmup_epochs * steps_per_epoch,
        total_steps=params.epochs * steps_per_epoch,
        min_lr=train.min_lr,
        frozen_steps=train.freeze_epochs * steps_per_epoch,
        head_lr=train.head_lr or params.lr,
    )
    # Weight averaging: validation, early stopping and the saved model use the running average
    # of the weights (BatchNorm statistics included) instead of the last step's.
    ema = None
    if params.train.ema_decay > 0:
        averaging = get_ema_multi_avg_fn(params.train.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=averaging, use_buffers=True)
    return Run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        scaler=grad_scaler(numerics.dtype, device),
        # Every process draws the same batch order and augmentations from the same seed.
        order_rng=torch.Generator().manual_seed(params.seed),
        augment_rng=torch.Generator(device=device).manual_seed(params.seed + 1),
        ranks=ranks,
        compile=compile,
        forward=wrap(model, ranks, compile),  # a new model trains from its first group
    )


def wrap(model: nn.Module, ranks: Ranks, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as the training step calls it: DDP all-reduces gradients between processes."""
    forward = model
    if ranks.distributed:
        on_gpu = next(model.parameters()).is_cuda
        devices = [torch.cuda.current_device()] if on_gpu else None
        forward = DistributedDataParallel(model, device_ids=devices)
    return torch.compile(forward) if compile else forward


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


def imbalance_loss(
    labels: np.ndarray, imbalance: str, device: torch.device
) -> tuple[nn.Module, float]:
    """The loss for `train.imbalance`, and its positive weight: with `pos_weight`, positives
    weigh NORMAL/PNEUMONIA, so both classes weigh the same in the loss (`sampler` balances
    the batches instead)."""
    positives = int(labels.sum())
    pos_weight = (len(labels) - positives) / positives if imbalance == "pos_weight" else 1.0
    loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    return loss, pos_weight


def train_step(
    run: Run,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    numerics: Numerics,
    share: float = 1.0,
) -> torch.Tensor:
    """One optimizer step on a ready batch; returns the loss (the mean over x).

    `share`: x's rows times the number of processes over the whole batch's rows. DDP averages
    the processes' gradients, so weighting each process's mean loss by it makes the step the
    gradient of the whole batch's mean loss, also when the shares differ by a row.
    """
    with numerics.autocast():
        logits = run.forward(x).float().squeeze(1)
    loss = loss_fn(logits, y)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is None:
        (loss * share).backward()
        run.optimizer.step()
    else:  # fp16: scale the loss so small gradients do not underflow, unscale before the step
        run.scaler.scale(loss * share).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    return loss.detach()


def train_groups_of_epoch(model: nn.Module, epoch: int, settings: TrainParams) -> int:
    """Make trainable the groups transfer learning's schedule gives this epoch (the head alone
    while frozen), in training mode with frozen BatchNorm statistics kept; returns the first
    trainable group."""
    groups = layer_groups(model)
    first = first_trainable_group(epoch, settings.freeze_epochs, settings.unfreeze, len(groups))
    set_trainable(model, groups, first)
    return first


def train_one_epoch(
    run: Run,
    data: TrainingData,
    params: Params,
    numerics: Numerics,
    loss_fn: nn.Module,
    epoch: int,
    teacher: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One pass over the training data, training the groups `train_groups_of_epoch` set;
    returns (mean loss, images per second), both over all processes. With a teacher, each
    label goes to the loss beside the teacher's logit for that image (`DistillationLoss`)."""
    balanced = params.train.imbalance == "sampler"
    ranks = run.ranks
    order = batch_order(data.labels, params.batch_size, balanced, run.order_rng, ranks.world)
    shares = [ranks.share(index) for index in order]
    smoothing = params.train.label_smoothing
    total_loss = torch.zeros((), device=numerics.device)
    seen, mine, started = 0, 0, time.perf_counter()
    progress = tqdm(
        data.batches(shares), total=len(order), desc=f"epoch {epoch}/{params.epochs}",
        unit="batch", leave=False, disable=not ranks.main,
    )  # fmt: skip
    for step, (images, labels) in enumerate(progress):
        rows = (len(order[step]), slice(ranks.rank, None, ranks.world))
        x = images.float().div_(255.0).unsqueeze(1)  # augment works on the [0, 1] scale
        x = numerics.normalize(augment(x, params.train.augment, run.augment_rng, rows).mul_(255))
        y = labels * (1 - smoothing) + 0.5 * smoothing
        if teacher is not None:
            y = torch.stack([y, teacher[shares[step].to(teacher.device)]], 1)
        share = len(x) * ranks.world / len(order[step])
        total_loss += train_step(run, x, y, loss_fn, numerics, share) * len(x)
        seen, mine = seen + len(order[step]), mine + len(x)
        if ranks.main and (step % 10 == 0 or step == len(order) - 1):
            rate = seen / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{total_loss.item() / mine:.4f}", img_s=f"{rate:.0f}")
    return ranks.sum(total_loss).item() / seen, seen / (time.perf_counter() - started)


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: TrainingData, numerics: Numerics, batch_size: int
) -> torch.Tensor:
    model.eval()
    logits = []
    for images, _ in data.batches(list(torch.arange(len(data.labels)).split(batch_size))):
        x = numerics.normalize(images.unsqueeze(1))
        with numerics.autocast():
            logits.append(model(x).float().squeeze(1))
    return torch.cat(logits)


def validate(
    model: nn.Module, data: TrainingData, numerics: Numerics, batch_size: int
) -> tuple[float, float]:
    """(loss, ROC-AUC) on validation data; the loss is unweighted, comparable across runs."""
    logits = predict_logits(model, data, numerics, batch_size)
    loss = F.binary_cross_entropy_with_logits(logits, data.labels).item()
    labels = data.labels.cpu().numpy()
    auc = roc_auc_score(labels, logits.cpu().numpy()) if len(set(labels)) == 2 else math.nan
    return loss, float(auc)


def new_progress() -> dict:
    """Where a run stands between epochs; it goes into the checkpoint as it is."""
    return {
        "epoch": 0,
        "best_score": -math.inf,
        "best_epoch": 0,
        "best_state": None,
        "stale_epochs": 0,
        "history": [],
    }


def fit(
    run: Run,
    train: TrainingData,
    val: TrainingData,
    params: Params,
    numerics: Numerics,
    loss_fn: nn.Module,
    progress: dict,
    on_epoch_end: Callable[[dict], None],
    teacher: torch.Tensor | None = None,
) -> dict:
    """Frozen-then-unfrozen epochs, keeping the best epoch by `train.monitor` on validation and
    stopping after `train.patience` epochs without a better one; returns progress.

    Under DDP only rank 0 validates, prints and calls `on_epoch_end`; every process gets its
    validation figures, so all keep the same progress and stop at the same epoch.
    """
    main = run.ranks.main
    for epoch in range(progress["epoch"] + 1, params.epochs + 1):
        first = train_groups_of_epoch(run.model, epoch, params.train)
        if first != run.trainable_from:  # DDP registers the trainable parameters as it wraps
            run.forward, run.trainable_from = wrap(run.model, run.ranks, run.compile), first
        lr = run.optimizer.param_groups[0]["lr"]
        train_loss, rate = train_one_epoch(run, train, params, numerics, loss_fn, epoch, teacher)
        val_loss, val_auc = math.nan, math.nan
        if main:
            val_loss, val_auc = validate(run.kept_model, val, numerics, 2 * params.batch_size)
        val_loss, val_auc = run.ranks.from_main(val_loss, val_auc)
        frozen = epoch <= params.train.freeze_epochs
        progress["history"].append(
            {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
             "lr": lr, "images_per_s": rate, "frozen": frozen}
        )  # fmt: skip
        progress["epoch"] = epoch
        # AUC saturates near 1 on an easy validation split; the loss keeps ranking epochs.
        score = val_auc if params.train.monitor == "auc" else -val_loss
        if score > progress["best_score"]:
            state = run.kept_model.state_dict()
            progress.update(
                best_score=score,
                best_epoch=epoch,
                best_state=copy.deepcopy({k: v.detach().cpu() for k, v in state.items()}),
                stale_epochs=0,
            )
        else:
            progress["stale_epochs"] += 1
        if main:
            print(
                f"epoch {epoch:3d}/{params.epochs}  train loss {train_loss:.4f}"
                f"  val loss {val_loss:.4f}  val AUC {val_auc:.4f}  lr {lr:.2e}"
                f"  {rate:.0f} img/s" + ("  (backbone frozen)" if frozen else "")
            )
            on_epoch_end(progress)
        if progress["stale_epochs"] >= params.train.patience:
            monitor, patience = params.train.monitor, params.train.patience
            if main:
                print(f"early stop: no better validation {monitor} for {patience} epochs")
            break
    return progress
