"""The training loop and its parts.

The whole preprocessed training set sits on the training device as uint8; each batch is
gathered, augmented and normalized there, so the accelerator never waits on CPU-side image
decoding or per-sample Python transforms.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cxr.atomic import atomic_path
from cxr.params import AugmentParams, Params


def pick_device(choice: str) -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but no CUDA device is available")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise ValueError("train.device: mps was asked for but MPS is not available")
    return torch.device(choice)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where the GPU supports it, none on CPU/MPS."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


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


def batch_order(
    labels: torch.Tensor, batch_size: int, balanced: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of index batches; `balanced` draws both classes equally often."""
    n = len(labels)
    if balanced:
        labels_cpu = labels.long().cpu()
        weights = (1.0 / torch.bincount(labels_cpu, minlength=2).clamp(min=1))[labels_cpu]
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def augment(x: torch.Tensor, aug: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Per-image random rotation, zoom, shift, flip, brightness and contrast, for a whole batch.

    x: (B, 1, H, W) floats in [0, 1] on the generator's device.
    """
    b = x.shape[0]

    def uniform(half_width: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=x.device)
        return (2 * u - 1) * half_width

    angle = uniform(math.radians(aug.rotation_deg))
    scale = 1 + uniform(aug.zoom)
    flip = torch.ones(b, device=x.device)
    if aug.hflip:
        flip = torch.where(torch.rand(b, generator=generator, device=x.device) < 0.5, -1.0, 1.0)
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


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze everything but the classifier head (transfer learning's first phase)."""
    head = set(model.get_classifier().parameters())
    for param in model.parameters():
        param.requires_grad = not frozen or param in head


def set_train_mode(model: nn.Module, frozen: bool) -> None:
    """Frozen backbone keeps its BatchNorm statistics too, not only its weights."""
    model.train()
    if frozen:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        model.get_classifier().train()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: float,
    std: float,
    batch_size: int,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    model.eval()
    logits = []
    for start in range(0, len(images), batch_size):
        x = (images[start : start + batch_size].float() / 255.0 - mean) / std
        x = x.unsqueeze(1).contiguous(memory_format=memory_format)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(model(x).float().squeeze(1))
    return torch.cat(logits)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    lr: float
    images_per_s: float
    frozen: bool


@dataclass
class TrainState:
    """Everything needed to continue an interrupted run exactly where it stopped."""

    epoch: int = 0
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    history: list[EpochRecord] = field(default_factory=list)
    epochs_without_improvement: int = 0


@dataclass
class Trainer:
    """Holds the objects one training run shares across epochs."""

    model: nn.Module
    params: Params
    device: torch.device
    mean: float
    std: float
    pos_weight: float
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    order_generator: torch.Generator = field(init=False)
    augment_generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.dtype = autocast_dtype(p.train.precision, self.device)
        self.memory_format = torch.contiguous_format
        if p.train.channels_last and self.device.type == "cuda":
            self.memory_format = torch.channels_last
        self.model.to(self.device, memory_format=self.memory_format)
        self.forward = torch.compile(self.model) if p.train.compile else self.model
        # Weight averaging: validation, early stopping and the saved model use the running
        # average of the weights (BatchNorm statistics included) instead of the last step's.
        self.ema = None
        if p.train.ema_decay > 0:
            averaging = get_ema_multi_avg_fn(p.train.ema_decay)
            self.ema = AveragedModel(self.model, multi_avg_fn=averaging, use_buffers=True)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=p.lr, weight_decay=p.train.weight_decay
        )
        self.order_generator = torch.Generator().manual_seed(p.seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(p.seed + 1)
        weight = torch.tensor(self.pos_weight, device=self.device)
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)

    def make_scheduler(self, steps_per_epoch: int) -> None:
        """Cosine annealing from `lr` to `train.min_lr`, stepped every batch."""
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer,
            T_max=self.params.epochs * steps_per_epoch,
            eta_min=self.params.train.min_lr,
        )

    def optimize(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a ready batch: forward, loss, backward, AdamW; returns the loss."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(x).float().squeeze(1)
        loss = self.loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def train_epoch(self, data: DeviceData, epoch: int, frozen: bool) -> tuple[float, float]:
        """One pass over the training data; returns (mean loss, images per second)."""
        p = self.params
        set_backbone_frozen(self.model, frozen)
        set_train_mode(self.model, frozen)
        balanced = p.train.imbalance == "sampler"
        batches = batch_order(data.labels, p.batch_size, balanced, self.order_generator)
        smoothing = p.train.label_smoothing
        total_loss = torch.zeros((), device=self.device)
        seen, started = 0, time.perf_counter()
        progress = tqdm(batches, desc=f"epoch {epoch}/{p.epochs}", unit="batch", leave=False)
        for step, index in enumerate(progress):
            index = index.to(self.device, non_blocking=True)
            x = data.images[index].float().div_(255.0).unsqueeze(1)
            x = augment(x, p.train.augment, self.augment_generator)
            x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            y = data.labels[index] * (1 - smoothing) + 0.5 * smoothing
            loss = self.optimize(x, y)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total_loss += loss.detach() * len(index)
            seen += len(index)
            if step % 10 == 0 or step == len(batches) - 1:
                rate = seen / (time.perf_counter() - started)
                progress.set_postfix(loss=f"{total_loss.item() / seen:.4f}", img_s=f"{rate:.0f}")
        return total_loss.item() / seen, seen / (time.perf_counter() - started)

    @property
    def kept_model(self) -> nn.Module:
        """The weights that are validated and kept: the average if there is one."""
        return self.model if self.ema is None else self.ema.module

    def validate(self, data: DeviceData) -> tuple[float, float]:
        """(loss, ROC-AUC) on validation data; the loss is unweighted, comparable across runs."""
        logits = predict_logits(
            self.forward if self.ema is None else self.ema.module,
            data.images,
            self.mean,
            self.std,
            2 * self.params.batch_size,
            self.dtype,
            self.memory_format,
        )
        loss = F.binary_cross_entropy_with_logits(logits, data.labels).item()
        labels = data.labels.cpu().numpy()
        auc = roc_auc_score(labels, logits.cpu().numpy()) if len(set(labels)) == 2 else math.nan
        return loss, float(auc)

    def fit(
        self,
        train: DeviceData,
        val: DeviceData,
        state: TrainState,
        on_epoch_end: Callable[[EpochRecord, TrainState], None],
    ) -> TrainState:
        """Frozen-then-unfrozen epochs with early stopping on validation AUC."""
        p = self.params
        for epoch in range(state.epoch + 1, p.epochs + 1):
            frozen = epoch <= p.train.freeze_epochs
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss, rate = self.train_epoch(train, epoch, frozen)
            val_loss, val_auc = self.validate(val)
            record = EpochRecord(epoch, train_loss, val_loss, val_auc, lr, rate, frozen)
            state.history.append(record)
            state.epoch = epoch
            if val_auc > state.best_auc:
                state.best_auc, state.best_epoch = val_auc, epoch
                state.best_state = copy.deepcopy(
                    {k: v.detach().cpu() for k, v in self.kept_model.state_dict().items()}
                )
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            print(
                f"epoch {epoch:3d}/{p.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}"
                f"  val AUC {val_auc:.4f}  lr {lr:.2e}  {rate:.0f} img/s"
                + ("  (backbone frozen)" if frozen else "")
            )
            on_epoch_end(record, state)
            if state.epochs_without_improvement >= p.train.patience:
                print(f"early stop: no better validation AUC for {p.train.patience} epochs")
                break
        return state

    def checkpoint(self, state: TrainState) -> dict:
        return {
            "state": state,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "order_generator": self.order_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, saved: dict) -> TrainState:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.order_generator.set_state(saved["order_generator"])
        self.augment_generator.set_state(saved["augment_generator"])
        torch.set_rng_state(saved["torch_rng"])
        return saved["state"]


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
