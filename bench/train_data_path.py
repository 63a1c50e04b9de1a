"""Training data path: how much of the bare model's speed the training loop keeps.

Images per second, on one device with one model, image size and batch, of:
  (a) the ceiling: `cxr.training.train_step` (forward, loss, backward, AdamW and scheduler
      step) on one random batch already on the device;
  (b) our data path: `cxr.training.train_one_epoch` over a `DeviceData` of exactly --steps
      batches (uint8 images on the device; gather, augment and normalize there, then the same
      `train_step`). The images are data/processed/train.npy when it exists at --size, random
      uint8 otherwise;
  (c) the streamed path: the same over a `StreamedData` of the same images, written to a .npy
      file and memory-mapped (gathered on the CPU, pinned on CUDA, one batch of prefetch), as
      the train stage runs when the splits exceed `runtime.memory_budget_gb`.
(b)/(a) is the share of the model's speed that the training loop keeps; the project's goal is
at least 0.9. (c)/(b) is what streaming costs against holding the split on the device.
All paths drive one model through one `create_run`, made as the train stage makes it
(params.yaml with --arch, --size and --batch replaced, no pretrained download).

Method (bench/ratios.py): the paths run interleaved, in rotating order, over several
rounds, each timed run after untimed warm-up steps of its own; the headline is the median of
the per-round ratios, since absolute images/s drift on a shared machine.

Run from the repository root:  .venv/bin/python bench/train_data_path.py --help
"""

from __future__ import annotations

import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from bare_step import ROOT, BareStep, Setup, arguments, describe, parse, prepare, sync
from ratios import interleave, ratio_table

from cxr import training
from cxr.batches import DeviceData, StreamedData
from cxr.processed import load_split, load_stats
from cxr.training import train_groups_of_epoch, train_one_epoch


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
    """(b), (c): `train_one_epoch` over exactly `steps` full batches, held on the device or
    streamed from a memory-mapped file."""

    def __init__(
        self, setup: Setup, images: np.ndarray, labels: np.ndarray, streamed: bool = False
    ) -> None:
        self.setup, self.images, self.labels, self.streamed = setup, images, labels, streamed
        self.epoch = 0
        self.folder = tempfile.TemporaryDirectory(prefix="train_data_path.")

    def data(self, rows: np.ndarray) -> DeviceData | StreamedData:
        """Set-up, untimed: the upload to the device, or the file the stream reads."""
        device = self.setup.numerics.device
        if not self.streamed:
            return DeviceData.from_arrays(self.images[rows], self.labels[rows], device)
        path = Path(self.folder.name) / "train.npy"
        np.save(path, self.images[rows])
        return StreamedData.from_arrays(np.load(path, mmap_mode="r"), self.labels[rows], device)

    def timed_epoch(self, steps: int) -> float:
        """Seconds of one epoch, its data set up beforehand as in the train stage."""
        s = self.setup
        data = self.data(np.arange(steps * s.params.batch_size) % len(self.images))
        sync(s.numerics.device)
        self.epoch += 1
        train_groups_of_epoch(s.run.model, self.epoch, s.params.train)
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

    names = [
        "(a) bare model step, random tensors",
        "(b) train_one_epoch over DeviceData",
        "(c) train_one_epoch over StreamedData",
    ]
    loops = [
        BareStep(setup), OurLoop(setup, images, labels), OurLoop(setup, images, labels, True)
    ]  # fmt: skip
    paths = {
        name: partial(loop, args.steps, args.warmup)
        for name, loop in zip(names, loops, strict=True)
    }
    rate, per_round = interleave(paths, args.rounds, args.budget)

    print(f"\n{len(per_round[names[0]])} rounds x {args.steps} timed steps per path, interleaved")
    ratio = ratio_table(names, rate, per_round, names[0])
    print(
        f"\n(b)/(a) = {ratio[names[1]]:.2f}  training loop vs. bare model, median over rounds "
        f"(goal >= 0.90: {'met' if ratio[names[1]] >= 0.9 else 'NOT met'})"
    )
    streamed = ratio_table(names[1:], rate, per_round, names[1])[names[2]]
    print(f"(c)/(b) = {streamed:.2f}  streamed from a memory-mapped file vs. held on the device")


if __name__ == "__main__":
    main()
