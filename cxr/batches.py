"""Feeding the training loop: the order of each epoch's batches and where their images come
from.

The preprocessed training set sits on the training device as uint8 when it fits there
(`DeviceData`), else batches stream from the memory-mapped arrays (`StreamedData`); either way
each batch is augmented and normalized on the device (cxr/augment.py), so the accelerator never
waits on CPU-side image decoding or per-sample Python transforms. Under torchrun every process
follows the same batch order and trains on its share of each batch (cxr/distributed.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cxr.processed import ProcessedSplit
from cxr.stage import StageError

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


def place_data(
    splits: list[ProcessedSplit], budget: int, device: torch.device
) -> tuple[list[TrainingData], str]:
    """On the device if the splits fit in the memory budget, else streamed from the arrays."""
    size = sum(split.images.nbytes for split in splits)
    kind = DeviceData if size <= budget else StreamedData
    how = "held on" if kind is DeviceData else "streamed to"
    note = f"{size / 1e9:.2f} GB of images {how} {device} (budget {budget / 1e9:.2f} GB)"
    return [kind.from_arrays(split.images, split.labels, device) for split in splits], note


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


def require_both_classes(name: str, split: ProcessedSplit) -> None:
    """ROC-AUC, early stopping and the imbalance weight need both classes in a split."""
    if len(np.unique(split.labels)) < 2:
        raise StageError(
            f"the {name} split holds only one class ({split.index['label'].iloc[0]}); ROC-AUC "
            "and early stopping need both: use more data or a larger split.val_fraction"
        )
