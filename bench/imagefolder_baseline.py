"""ImageFolder baseline: how much of the bare model's speed the usual torchvision loader keeps.

Images per second, on one device with one model, image size and batch, of:
  (a) the ceiling: `cxr.training.train_step` on one random batch already on the device (the
      same (a) as in train_data_path.py);
  (c) the baseline people write: torchvision `ImageFolder` over JPEG files on disk, PIL
      transforms (Grayscale, RandomRotation(10), RandomResizedCrop, RandomHorizontalFlip,
      ColorJitter(0.1, 0.1), ToTensor, Normalize), `DataLoader(num_workers=--workers,
      shuffled)`, then the same `train_step`;
  (c0) that loader alone: batches moved to the device, no step.
(c)/(a) is the share of the model's speed the baseline keeps, to set beside
train_data_path.py's (b)/(a) at the same settings; (c0)/(a) below 1 means the loader cannot
feed the model, above 1 that the model limits (c).

The JPEGs are by default a demo set generated at Kaggle-like sizes (1000-2900 px), where
decoding dominates; --images reads a Kaggle-layout train/ folder instead (kermany-224 holds
224 px files, far cheaper to decode). The two differ a lot; the output says which was used.

Method (bench/ratios.py): the paths run interleaved, in rotating order, over several rounds,
each timed run after untimed warm-up steps of its own; the headlines are medians of
per-round ratios, since absolute images/s drift on a shared machine.

Run from the repository root:  .venv/bin/python bench/imagefolder_baseline.py --help
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from bare_step import BareStep, Setup, arguments, describe, parse, prepare, sync
from ratios import interleave, ratio_table

from cxr.demo import generate_demo_dataset
from cxr.images import image_size
from cxr.training import train_step

# Normalization for Normalize(); its values do not change the speed.
MEAN, STD = 0.5, 0.25


class ImageFolderLoop:
    """(c), or (c0) with `train=False`: a fresh DataLoader, and its workers, for every run.

    The workers get ahead by up to `PREFETCH` batches each while the loader starts; the warm-up
    is made that much longer, so that a loader slower than the model has used up that head
    start before the timing begins. The workers stop after the run, so they never take CPU
    from (a). The sampler is shuffle=True's RandomSampler, drawing as many samples as the run
    needs (several shuffled epochs over a small folder).
    """

    PREFETCH = 2  # DataLoader's default prefetch_factor

    def __init__(self, setup: Setup, folder: Path, workers: int, train: bool) -> None:
        self.setup, self.workers, self.train = setup, workers, train
        size = setup.params.image_size
        transform = transforms.Compose(
            [
                transforms.Grayscale(num_output_channels=1),
                transforms.RandomRotation(10),
                transforms.RandomResizedCrop(size, scale=(0.9, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ColorJitter(brightness=0.1, contrast=0.1),
                transforms.ToTensor(),
                transforms.Normalize([MEAN], [STD]),
            ]
        )
        self.dataset = datasets.ImageFolder(str(folder), transform=transform)

    def __call__(self, steps: int, warmup: int) -> tuple[int, float]:
        """(images, seconds) of `steps` timed batches after `warmup` (+ prefetch) untimed ones."""
        s, batch = self.setup, self.setup.params.batch_size
        device = s.numerics.device
        warmup += self.PREFETCH * self.workers
        loader = DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=RandomSampler(self.dataset, num_samples=(warmup + steps) * batch),
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=self.PREFETCH if self.workers else None,
        )
        s.run.model.train()
        batches = iter(loader)
        start = time.perf_counter()
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                start = time.perf_counter()
            x, y = next(batches)
            x = x.to(device, non_blocking=True).contiguous(memory_format=s.numerics.memory_format)
            if self.train:
                train_step(s.run, x, y.to(device, non_blocking=True).float(), s.loss_fn, s.numerics)
        sync(device)
        return steps * batch, time.perf_counter() - start  # workers stop with `batches`, after


def jpeg_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The train/ folder that (c) reads, and what it holds."""
    if args.images:
        folder, origin = args.images, f"--images {args.images}"
    else:
        print(f"generating {args.demo_patients} demo patients, {args.min_side}-{args.max_side} px")
        generate_demo_dataset(
            tmp / "chest_xray",
            patients=args.demo_patients,
            seed=0,
            min_side=args.min_side,
            max_side=args.max_side,
        )
        folder = tmp / "chest_xray" / "train"
        origin = f"demo JPEGs generated at {args.min_side}-{args.max_side} px"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        raise SystemExit(f"no images under {folder}")
    sample = [image_size(p) for p in files[:: max(1, len(files) // 200)]]
    width = statistics.median(w for w, _ in sample)
    height = statistics.median(h for _, h in sample)
    return folder, f"{origin}: {len(files)} files, median {width:.0f} x {height:.0f} px"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument(
        "--images",
        type=Path,
        help="a Kaggle-layout train/ folder (NORMAL/, PNEUMONIA/), e.g. "
        "../shared/data/kermany-224/chest_xray/train; default: generate demo JPEGs",
    )
    parser.add_argument("--demo-patients", type=int, default=16, help="size of the demo set")
    parser.add_argument("--min-side", type=int, default=1000, help="demo JPEG sides, px")
    parser.add_argument("--max-side", type=int, default=2900, help="demo JPEG sides, px")
    args = parse(parser)
    setup = prepare(args, MEAN, STD)

    with tempfile.TemporaryDirectory(prefix="imagefolder_baseline_") as tmp:
        folder, origin = jpeg_folder(args, Path(tmp))
        print(f"{describe(setup)}\n(c) images: {origin}")
        extra = ImageFolderLoop.PREFETCH * args.workers
        print(
            f"untimed warm-up steps before each timed run: (a) {args.warmup}, "
            f"(c) and (c0) {args.warmup + extra}"
        )

        names = [
            "(a) bare model step, random tensors",
            "(c) ImageFolder+PIL",
            "(c0) its loader alone, no model",
        ]
        bare = BareStep(setup)
        loop = partial(ImageFolderLoop, setup, folder, args.workers)
        paths = {
            names[0]: partial(bare, args.steps, args.warmup),
            names[1]: partial(loop(train=True), args.steps, args.warmup),
            names[2]: partial(loop(train=False), args.steps, args.warmup),
        }
        rate, per_round = interleave(paths, args.rounds, args.budget)

    print(f"\n{len(per_round[names[0]])} rounds x {args.steps} timed steps per path, interleaved")
    ratio = ratio_table(names, rate, per_round, names[0])
    print(
        f"\nmedians over rounds:"
        f"\n(c)/(a) = {ratio[names[1]]:.2f}  ImageFolder+PIL baseline vs. bare model"
        f"\n(c0)/(a) = {ratio[names[2]]:.2f}  its loader alone vs. bare model "
        f"(below 1: the loader limits (c))"
    )


if __name__ == "__main__":
    main()
