"""Training data path: how much of the bare model's speed the training loop keeps.

Images per second, on one device with one model, image size and batch, of:
  (a) the ceiling: `cxr.training.train_step` (forward, loss, backward, AdamW and scheduler
      step) on one random batch already on the device;
  (b) our data path: `cxr.training.train_one_epoch` over a `DeviceData` of exactly --steps
      batches (uint8 images on the device; gather, augment and normalize there, then the same
      `train_step`). The images are data/processed/train.npy when it exists at --size, random
      uint8 otherwise.
(b)/(a) is the share of the model's speed that the training loop keeps; the project's goal is
at least 0.9. Both paths drive one model through one `create_run`, made as the train stage
makes it (params.yaml with --arch, --size and --batch replaced, no pretrained download).

Method (bench/ratios.py): the two paths run interleaved, in rotating order, over several
rounds, each timed run after untimed warm-up steps of its own; the headline is the median of
the per-round ratios, since absolute images/s drift on a shared machine.

Run from the repository root:  .venv/bin/python bench/train_data_path.py --help
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from bare_step import ROOT, BareStep, Setup, arguments, describe, parse, prepare, sync
from ratios import interleave, ratio_table

from cxr import training
from cxr.processed import load_split, load_stats
from cxr.training import DeviceData, train_one_epoch


def training_images(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, float, float, str]:
    """Images, labels, normalization and where they come from."""
    try:
        stats, split = load_stats(folder), load_split("train", folder)
        if split.images.shape[1:] == (size, size):
            where = f"{folder}/train.npy ({len(split.labels)} images)"
            return np.asarray(split.images), split.labels, stats["mean"], stats["std"], where
    except (OSError, KeyError, ValueError):
        pass
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, size, size), dtype=np.uint8)
    labels = (rng.random(256) < 0.75).astype(np.int64)
    return images, labels, 0.5, 0.25, f"random uint8 (no {folder}/train.npy at {size} px)"


class OurLoop:
    """(b): `train_one_epoch` over a DeviceData of exactly `steps` full batches."""

    def __init__(self, setup: Setup, images: np.ndarray, labels: np.ndarray) -> None:
        self.setup, self.images, self.labels = setup, images, labels
        self.epoch = 0

    def timed_epoch(self, steps: int) -> float:
        """Seconds of one epoch; uploading its DeviceData is set-up, as in the train stage."""
        s = self.setup
        rows = np.arange(steps * s.params.batch_size) % len(self.images)
        data = DeviceData.from_arrays(self.images[rows], self.labels[rows], s.numerics.device)
        sync(s.numerics.device)
        self.epoch += 1
        started = time.perf_counter()
        train_one_epoch(s.run, data, s.params, s.numerics, s.loss_fn, self.epoch)
        return time.perf_counter() - started  # its closing loss.item() waited for the device

    def __call__(self, steps: int, warmup: int) -> tuple[int, float]:
        """(images, seconds) of an epoch of `steps` steps, after an untimed one of `warmup`."""
        if warmup:
            self.timed_epoch(warmup)
        return steps * self.setup.params.batch_size, self.timed_epoch(steps)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument(
        "--processed",
        type=Path,
        default=ROOT / "data" / "processed",
        help="preprocessed arrays for (b), used when their size matches --size",
    )
    args = parse(parser)
    training.tqdm = partial(tqdm, disable=True)  # train_one_epoch's bar would split the table
    images, labels, mean, std, origin = training_images(args.processed, args.size)
    setup = prepare(args, mean, std)
    print(f"{describe(setup)}\n(b) images: {origin}")
    print(f"untimed warm-up steps before each timed run: {args.warmup}")

    names = ["(a) bare model step, random tensors", "(b) train_one_epoch over DeviceData"]
    bare, ours = BareStep(setup), OurLoop(setup, images, labels)
    paths = {
        names[0]: partial(bare, args.steps, args.warmup),
        names[1]: partial(ours, args.steps, args.warmup),
    }
    rate, per_round = interleave(paths, args.rounds, args.budget)

    print(f"\n{len(per_round[names[0]])} rounds x {args.steps} timed steps per path, interleaved")
    ratio = ratio_table(names, rate, per_round, names[0])[names[1]]
    print(
        f"\n(b)/(a) = {ratio:.2f}  training loop vs. bare model, median over rounds "
        f"(goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
