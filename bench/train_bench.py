"""Training data path: how close the training loop comes to the bare model's speed.

What it measures, in images per second, on one device with one model, image size and batch:
  (a) the ceiling: the bare model's forward + loss + backward + AdamW step on random tensors
      already on the device;
  (b) our data path: `cxr.training.Trainer.train_epoch` over a `DeviceData` (uint8 images on
      the device; gather, augment, normalize there, then the same step as (a)); the images are
      data/processed/train.npy when it exists at this size, random uint8 otherwise;
  (c) the baseline people use: torchvision `ImageFolder` over JPEG files on disk, PIL
      transforms (Grayscale, RandomRotation(10), RandomResizedCrop, RandomHorizontalFlip,
      ColorJitter(0.1, 0.1), ToTensor, Normalize), `DataLoader(num_workers=2, shuffle)`;
  (c0) that loader alone, batches moved to the device but no training step: whether the
      loader or the model limits (c).
(b)/(a) is the share of the model's speed the training loop keeps (the project's goal is at
least 0.9); (c)/(a) the same share for the baseline. All paths drive one model through one
`Trainer`, so they share the train stage's optimizer, loss, autocast dtype and memory format,
and each timed run follows its own untimed warm-up steps.

Why ratios: the machine may be shared, so absolute images/s drift. The paths run interleaved,
in rotating order, over several rounds, so drift slows them alike; the headline ratios are
medians of per-round ratios. The JPEGs for (c) are by default generated at
Kaggle-like sizes (1000-2900 px), where decoding dominates; `--images` points at a
Kaggle-layout train/ folder instead (kermany-224 holds 224 px files, far cheaper to decode):
the two cases differ a lot, and the output says which was used.

Run from the repository root:  .venv/bin/python bench/train_bench.py --help
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets, transforms
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ratios import ratio_table  # noqa: E402  (bench/ is the script's folder)

from cxr import training  # noqa: E402
from cxr.demo import generate_demo_dataset  # noqa: E402
from cxr.images import image_size  # noqa: E402
from cxr.model import create_model  # noqa: E402
from cxr.params import Params, load_params  # noqa: E402
from cxr.processed import load_split, load_stats  # noqa: E402
from cxr.training import DeviceData, Trainer  # noqa: E402


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--arch", default="densenet121", help="timm architecture")
    parser.add_argument("--size", type=int, default=64, help="network input side, px")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path per round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved repetitions, at most")
    parser.add_argument(
        "--budget",
        type=float,
        default=120,
        help="seconds of timing after which no new round starts (2 rounds run at least)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps before every timed run; (c) and (c0) get 2 more per loader worker "
        "(its prefetch)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (c)")
    parser.add_argument(
        "--images",
        type=Path,
        help="a Kaggle-layout train/ folder (NORMAL/, PNEUMONIA/) for (c), e.g. "
        "../shared/data/kermany-224/chest_xray/train; default: generate demo JPEGs",
    )
    parser.add_argument("--demo-patients", type=int, default=16, help="size of the demo set")
    parser.add_argument("--min-side", type=int, default=1000, help="demo JPEG sides, px")
    parser.add_argument("--max-side", type=int, default=2900, help="demo JPEG sides, px")
    parser.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="the rest of the settings"
    )
    parser.add_argument(
        "--processed",
        type=Path,
        default=ROOT / "data" / "processed",
        help="preprocessed arrays for (b), used when their size matches --size",
    )
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --batch must be at least 1, --warmup at least 0")
    return args


def bench_params(args: argparse.Namespace) -> Params:
    """params.yaml with this run's size, batch and architecture (no pretrained download)."""
    params = load_params(args.params)
    return dataclasses.replace(
        params,
        image_size=args.size,
        batch_size=args.batch,
        model=dataclasses.replace(params.model, arch=args.arch, pretrained="none"),
    )


def make_trainer(params: Params, device: torch.device, mean: float, std: float) -> Trainer:
    """A fresh model in a Trainer, with the train stage's settings."""
    torch.manual_seed(params.seed)
    model = create_model(params.model.arch, "none", params.model.drop_rate)
    trainer = Trainer(model, params, device, mean, std, pos_weight=3.0)
    trainer.make_scheduler(steps_per_epoch=1000)
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Bare:
    """(a): the same random batch, already on the device, every step."""

    def __init__(self, trainer: Trainer, batch: int, size: int, seed: int) -> None:
        self.trainer = trainer
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 1, size, size, generator=generator)
        y = (torch.rand(batch, generator=generator) < 0.75).float()
        self.x = x.to(trainer.device).contiguous(memory_format=trainer.memory_format)
        self.y = y.to(trainer.device)
        trainer.model.train()

    def run(self, steps: int, warmup: int) -> int:
        for _ in range(warmup):
            self.trainer.optimize(self.x, self.y)
        sync(self.trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.trainer.optimize(self.x, self.y)
        sync(self.trainer.device)
        self.seconds = time.perf_counter() - start
        return steps * len(self.y)


class Ours:
    """(b): Trainer.train_epoch over a DeviceData of exactly `steps` full batches."""

    def __init__(self, trainer: Trainer, images: np.ndarray, labels: np.ndarray, batch: int):
        self.trainer, self.images, self.labels, self.batch = trainer, images, labels, batch
        self.epoch = 0

    def data(self, steps: int) -> DeviceData:
        rows = np.arange(steps * self.batch) % len(self.images)
        return DeviceData.from_arrays(self.images[rows], self.labels[rows], self.trainer.device)

    def run(self, steps: int, warmup: int) -> int:
        """An untimed epoch of `warmup` steps, then a timed one of `steps` steps.

        Uploading the DeviceData is set-up, as in the train stage, and is not timed.
        """
        if warmup:
            self.epoch += 1
            self.trainer.train_epoch(self.data(warmup), self.epoch, frozen=False)
        data = self.data(steps)
        sync(self.trainer.device)
        self.epoch += 1
        start = time.perf_counter()
        self.trainer.train_epoch(data, self.epoch, frozen=False)
        self.seconds = time.perf_counter() - start
        return len(data.labels)


class Baseline:
    """(c): ImageFolder + PIL transforms + DataLoader, a fresh loader iterator per run.

    Each run starts its workers, runs `warmup` untimed steps and then times `steps` steps; the
    workers stop after the run, so they never take CPU from (a) or (b). The workers get ahead
    by up to `PREFETCH` batches each while the pipeline starts; the warm-up is made that much
    longer, so that a loader slower than the model has used up that head start before the
    timing begins (else a short run would time batches decoded before it). The sampler is
    shuffle=True's RandomSampler, drawing as many samples as the run needs (several shuffled
    epochs over a small folder).
    """

    PREFETCH = 2  # DataLoader's default prefetch_factor

    def __init__(self, trainer: Trainer, folder: Path, args: argparse.Namespace) -> None:
        self.trainer, self.args = trainer, args
        tf = transforms.Compose(
            [
                transforms.Grayscale(num_output_channels=1),
                transforms.RandomRotation(10),
                transforms.RandomResizedCrop(args.size, scale=(0.9, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ColorJitter(brightness=0.1, contrast=0.1),
                transforms.ToTensor(),
                transforms.Normalize([trainer.mean], [trainer.std]),
            ]
        )
        self.dataset = datasets.ImageFolder(str(folder), transform=tf)
        trainer.model.train()

    def run(self, steps: int, warmup: int, train: bool = True) -> int:
        """Images seen in the timed steps; `train=False` only loads and moves the batches."""
        device, batch = self.trainer.device, self.args.batch
        warmup += self.PREFETCH * self.args.workers
        sampler = RandomSampler(self.dataset, num_samples=(warmup + steps) * batch)
        loader = DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.args.workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=self.PREFETCH if self.args.workers else None,
        )
        batches = iter(loader)
        start = time.perf_counter()
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                start = time.perf_counter()
            x, y = next(batches)
            x = x.to(device, non_blocking=True).contiguous(memory_format=self.trainer.memory_format)
            if train:
                self.trainer.optimize(x, y.to(device, non_blocking=True).float())
        sync(device)
        self.seconds = time.perf_counter() - start
        return steps * batch  # the workers stop when `batches` goes, after the timing


def training_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float, float, str]:
    """Images, labels, normalization and a description for (b)."""
    try:
        stats = load_stats(args.processed)
        split = load_split("train", args.processed)
        if split.images.shape[1:] == (args.size, args.size):
            where = f"{args.processed}/train.npy ({len(split.labels)} images)"
            return np.asarray(split.images), split.labels, stats["mean"], stats["std"], where
    except (OSError, KeyError, ValueError):
        pass
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, args.size, args.size), dtype=np.uint8)
    labels = (rng.random(256) < 0.75).astype(np.int64)
    return images, labels, 0.5, 0.25, "random uint8 (no data/processed/train.npy at this size)"


def jpeg_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The train/ folder (c) reads, and what it holds."""
    if args.images:
        folder, origin = args.images, f"--images {args.images}"
    else:
        print(
            f"generating {args.demo_patients} demo patients at {args.min_side}-{args.max_side} px"
        )
        generate_demo_dataset(
            tmp / "chest_xray",
            patients=args.demo_patients,
            seed=0,
            min_side=args.min_side,
            max_side=args.max_side,
        )
        folder, origin = tmp / "chest_xray" / "train", "demo JPEGs generated at Kaggle-like sizes"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        raise SystemExit(f"no images under {folder}")
    sample = [image_size(p) for p in files[:: max(1, len(files) // 200)]]
    width = statistics.median(w for w, _ in sample)
    height = statistics.median(h for _, h in sample)
    return folder, f"{origin}: {len(files)} files, median {width:.0f} x {height:.0f} px"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = training.pick_device(args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    training.tqdm = partial(tqdm, disable=True)  # train_epoch's progress bar
    params = bench_params(args)
    images, labels, mean, std, data_origin = training_images(args)

    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        folder, jpeg_origin = jpeg_folder(args, Path(tmp))
        trainer = make_trainer(params, device, mean, std)  # one model, warmed up once, for all
        bare = Bare(trainer, args.batch, args.size, params.seed)
        ours = Ours(trainer, images, labels, args.batch)
        base = Baseline(trainer, folder, args)
        dtype = bare.trainer.dtype or torch.float32
        print(
            f"device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", {torch.get_num_threads()} torch threads; {args.arch}, {args.size} px, "
            f"batch {args.batch}, {str(dtype).removeprefix('torch.')}, "
            f"{'channels_last' if bare.trainer.memory_format == torch.channels_last else 'NCHW'}"
            f"\n(b) images: {data_origin}\n(c) images: {jpeg_origin}"
        )

        extra = Baseline.PREFETCH * args.workers
        print(
            f"untimed warm-up steps before each timed run: (a), (b) {args.warmup}; "
            f"(c), (c0) {args.warmup + extra}"
        )

        names = [
            "(a) bare model, random tensors",
            "(b) Trainer.train_epoch",
            "(c) ImageFolder+PIL",
            "(c0) its loader alone, no model",
        ]
        paths: dict[str, Callable[[], tuple[int, float]]] = {
            names[0]: lambda: (bare.run(args.steps, args.warmup), bare.seconds),
            names[1]: lambda: (ours.run(args.steps, args.warmup), ours.seconds),
            names[2]: lambda: (base.run(args.steps, args.warmup), base.seconds),
            names[3]: lambda: (base.run(args.steps, args.warmup, train=False), base.seconds),
        }
        seen = dict.fromkeys(names, 0)
        seconds = dict.fromkeys(names, 0.0)
        per_round: dict[str, list[float]] = {name: [] for name in names}
        timing_started = time.perf_counter()
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                n, s = paths[name]()
                seen[name] += n
                seconds[name] += s
                per_round[name].append(n / s)
            rates = ", ".join(f"{name.split()[0]} {per_round[name][-1]:.1f}" for name in names)
            print(f"  round {r + 1}/{args.rounds} images/s: {rates}")
            spent = time.perf_counter() - timing_started
            if r + 1 >= 2 and r + 1 < args.rounds and spent > args.budget:
                print(f"  --budget {args.budget:.0f} s spent ({spent:.0f} s): stopping here")
                break

    rate = {name: seen[name] / seconds[name] for name in names}
    rounds = len(per_round[names[0]])
    print(f"\n{rounds} rounds x {args.steps} timed steps per path, interleaved")
    ratio = ratio_table(names, rate, per_round, names[0])
    ours, base = ratio[names[1]], ratio[names[2]]
    ours_vs_base = statistics.median(
        x / y for x, y in zip(per_round[names[1]], per_round[names[2]], strict=True)
    )
    print(
        f"\nmedians over rounds:"
        f"\n(b)/(a) = {ours:.2f}  training loop vs. bare model "
        f"(goal >= 0.90: {'met' if ours >= 0.9 else 'NOT met'})"
        f"\n(c)/(a) = {base:.2f}  ImageFolder+PIL baseline vs. bare model"
        f"\n(b)/(c) = {ours_vs_base:.2f}  training loop vs. baseline"
        f"\n(c0)/(a) = {ratio[names[3]]:.2f}  baseline loader alone vs. bare model "
        f"(below 1: the loader limits (c))"
    )


if __name__ == "__main__":
    main()
