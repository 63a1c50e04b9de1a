"""The training loop, as free functions that take the objects they use.

The preprocessed training set sits on the training device as uint8 when it fits there
(`DeviceData`), else batches stream from the memory-mapped arrays (`StreamedData`); either way
each batch is augmented and normalized on the device, so the accelerator never waits on
CPU-side image decoding or per-sample Python transforms. Under torchrun every process follows
the same batch order and trains on its share of each batch (cxr/distributed.py).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cxr.atomic import atomic_path
from cxr.device import grad_scaler
from cxr.distributed import ONE_PROCESS, Ranks
from cxr.params import AugmentParams, Params

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, H, W), float labels (B,)


@dataclass
class DeviceData:
    """A split held on the training device: uint8 images (N, H, W) and float labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, device: torch.device):
        return cls(
            torch.from_numpy(np.array(images, dtype=np.uint8)).to(device),
            torch.from_numpy(labels.astype(np.float32)).to(device),
        )

    def batches(self, order: list[torch.Tensor]) -> Iterator[Batch]:
        for index in order:
            index = index.to(self.labels.device, non_blocking=True)
            yield self.images[index], self.labels[index]


@dataclass
class StreamedData:
    """A split too large for the device: images stay in the memory-mapped array and each
    batch is gathered on the CPU while the previous one trains (one batch of prefetch), into
    pinned memory on CUDA so the copy to the GPU is asynchronous."""

    images: np.ndarray  # (N, H, W) uint8, memory-mapped
    labels: torch.Tensor  # (N,) float, on the device: small

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, device: torch.device):
        return cls(images, torch.from_numpy(labels.astype(np.float32)).to(device))

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        rows = torch.from_numpy(self.images[index.numpy()])
        return rows.pin_memory() if self.labels.is_cuda else rows

    def batches(self, order: list[torch.Tensor]) -> Iterator[Batch]:
        device = self.labels.device
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(self._gather, order[0]) if order else None
            for step, index in enumerate(order):
                rows = pending.result()
                if step + 1 < len(order):
                    pending = prefetch.submit(self._gather, order[step + 1])
                yield rows.to(device, non_blocking=True), self.labels[index.to(device)]


TrainingData = DeviceData | StreamedData


@dataclass(frozen=True)
class Numerics:
    """How batches are laid out and computed on the training device, fixed for a run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    memory_format: torch.memory_format
    mean: float  # training-set pixel statistics, on the [0, 1] scale
    std: float

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats (B, 1, H, W) to the network's input."""
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


@dataclass
class Run:
    """What one training run advances step by step; `checkpoint` saves all of it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
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
    scheduler = warmup_cosine(
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


def steps_per_epoch(n: int, batch_size: int, processes: int = 1) -> int:
    """How many batches `batch_order` makes of n images."""
    steps = -(-n // batch_size)
    tail = n % batch_size
    return steps - 1 if steps > 1 and 0 < tail < processes else steps


def batch_order(
    labels: torch.Tensor,
    batch_size: int,
    balanced: bool,
    generator: torch.Generator,
    processes: int = 1,
) -> list[torch.Tensor]:
    """One epoch of index batches; `balanced` draws both classes equally often.

    A last batch with fewer images than there are processes joins the one before it, so every
    process has rows in every step.
    """
    n = len(labels)
    if balanced:
        labels_cpu = labels.long().cpu()
        weights = (1.0 / torch.bincount(labels_cpu, minlength=2).clamp(min=1))[labels_cpu]
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > steps_per_epoch(n, batch_size, processes):
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def augment(
    x: torch.Tensor,
    aug: AugmentParams,
    generator: torch.Generator,
    rows: tuple[int, slice] | None = None,
) -> torch.Tensor:
    """Per-image random rotation, zoom, shift, flip, brightness and contrast, for a whole batch.

    x: (B, 1, H, W) floats in [0, 1] on the generator's device. Under DDP, x is one process's
    share of a batch: rows = (size of the whole batch, the share's rows in it). The random
    draws are made for the whole batch and the share's rows kept, so each image is augmented
    the same however many processes train.
    """
    n, keep = rows if rows is not None else (x.shape[0], slice(None))

    def draw() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device)[keep]

    def uniform(half_width: float) -> torch.Tensor:
        return (2 * draw() - 1) * half_width

    b = x.shape[0]
    angle = uniform(math.radians(aug.rotation_deg))
    scale = 1 + uniform(aug.zoom)
    flip = torch.ones(b, device=x.device)
    if aug.hflip:
        flip = torch.where(draw() < 0.5, -1.0, 1.0)
    shift_x, shift_y = 2 * uniform(aug.translate), 2 * uniform(aug.translate)
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1 + uniform(aug.contrast)).view(b, 1, 1, 1)
    brightness = uniform(aug.brightness).view(b, 1, 1, 1)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW's parameter groups: the head's first (its learning rate is the one logged), then
    the backbone's at `lr * backbone_lr_scale`; each split by timm's convention of no weight
    decay on norm weights and biases (1-d parameters) and the model's `no_weight_decay()`.

    Fine-tuning pretrained features often wants a lower backbone rate than a new head's; the
    default scale 1.0 trains every weight at `lr` as before.
    """
    head = set(layer_groups(model)[-1])
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        decay = not (parameter.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((name in head, decay), []).append(parameter)
    return [
        {"params": groups[is_head, decay], "head": is_head,
         "lr": lr if is_head else lr * backbone_lr_scale,
         "weight_decay": weight_decay if decay else 0.0}
        for is_head in (True, False) for decay in (False, True) if (is_head, decay) in groups
    ]  # fmt: skip


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr: float,
    frozen_steps: int = 0,
    head_lr: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate per batch: a constant `head_lr` for the head alone while the backbone
    is frozen, then a linear warm-up to each group's rate and cosine annealing to `min_lr`
    (scaled like the group's rate) over the remaining steps.

    A network trained from scratch at a high learning rate can stall in its first updates
    (BatchNorm statistics still settling); a short warm-up lets it start gently. A new head on
    frozen pretrained features needs no warm-up, and must not get the decay either: when warm-up
    and cosine spanned the frozen epochs too, a one-epoch frozen phase ended at about lr/150
    and its head had not learned (validation AUC 0.36 on real X-rays, efficientnet-lite0). So
    the schedule proper starts when the backbone thaws. Without frozen steps this is exactly
    the former LinearLR + CosineAnnealingLR schedule, in closed form.
    """
    cosine_steps = max(1, total_steps - frozen_steps - warmup_steps)

    def factor(step: int, base_lr: float, head: bool) -> float:
        if step < frozen_steps and head:
            return (head_lr or base_lr) / base_lr
        # Frozen groups have no gradients, so their rate is moot until they thaw: they wait at
        # the rate they thaw into.
        step = max(0, step - frozen_steps)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        floor = min_lr / optimizer.param_groups[0]["initial_lr"]  # min_lr is the head's floor
        progress = min(step - warmup_steps, cosine_steps) / cosine_steps
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    lambdas = [
        functools.partial(factor, base_lr=group["initial_lr"], head=group.get("head", True))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names from the stem to the head, in timm's coarse groups (stem, blocks, head)."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def first_trainable_group(epoch: int, freeze_epochs: int, unfreeze: str, groups: int) -> int:
    """Transfer learning's schedule: the head alone for `freeze_epochs`, then either the whole
    network at once (`all`) or one more group per epoch from the top down (`progressive`)."""
    head = groups - 1
    if epoch <= freeze_epochs:
        return head
    if unfreeze == "all":
        return 0
    return max(0, head - (epoch - freeze_epochs))


def set_trainable(model: nn.Module, groups: list[list[str]], first: int) -> None:
    """Train groups `first`.. only; frozen groups keep their BatchNorm statistics too."""
    trainable = {name for group in groups[first:] for name in group}
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


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


def train_one_epoch(
    run: Run,
    data: TrainingData,
    params: Params,
    numerics: Numerics,
    loss_fn: nn.Module,
    epoch: int,
) -> tuple[float, float]:
    """One pass over the training data; returns (mean loss, images per second), both over all
    processes."""
    groups = layer_groups(run.model)
    first = first_trainable_group(
        epoch, params.train.freeze_epochs, params.train.unfreeze, len(groups)
    )
    set_trainable(run.model, groups, first)
    if first != run.trainable_from:
        run.forward, run.trainable_from = wrap(run.model, run.ranks, run.compile), first
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
        x = images.float().div_(255.0).unsqueeze(1)
        x = numerics.normalize(augment(x, params.train.augment, run.augment_rng, rows))
        y = labels * (1 - smoothing) + 0.5 * smoothing
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
        x = numerics.normalize(images.float().div(255.0).unsqueeze(1))
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
) -> dict:
    """Frozen-then-unfrozen epochs, keeping the best epoch by `train.monitor` on validation and
    stopping after `train.patience` epochs without a better one; returns progress.

    Under DDP only rank 0 validates, prints and calls `on_epoch_end`; every process gets its
    validation figures, so all keep the same progress and stop at the same epoch.
    """
    main = run.ranks.main
    for epoch in range(progress["epoch"] + 1, params.epochs + 1):
        lr = run.optimizer.param_groups[0]["lr"]
        train_loss, rate = train_one_epoch(run, train, params, numerics, loss_fn, epoch)
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


def checkpoint(run: Run, progress: dict) -> dict:
    """A plain dict with everything an interrupted run needs to continue exactly."""
    return {
        "progress": progress,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "ema": None if run.ema is None else run.ema.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "order_rng": run.order_rng.get_state(),
        "augment_rng": run.augment_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore(run: Run, saved: dict) -> dict:
    """Put a checkpoint's state back into `run`; returns its progress."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(saved["ema"])
    if run.scaler is not None:
        run.scaler.load_state_dict(saved["scaler"])
    run.order_rng.set_state(saved["order_rng"])
    run.augment_rng.set_state(saved["augment_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved["progress"]


def save_checkpoint(path: Path, saved: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)
