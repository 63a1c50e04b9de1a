"""Inference layout on the CPU: `Classifier` loaded channels_last ÷ the same model in NCHW.

The guard, evaluate, Grad-CAM and export stages, and every deployed form, run the network
through `cxr.classifier.Classifier.load` in fp32 (what they report is what the served model
computes, so no autocast). This times its two inference calls on random uint8 images, with an
untrained network saved and loaded as the train stage saves it:

  (a) `assess`, NCHW                (b) `assess`, channels_last (`Classifier.load`'s default)
  (c) `features`, NCHW              (d) `features`, channels_last

`assess` is the logit (what evaluate and export run over validation and test); `features`
is every feature stage's pooled output (what the guard stage runs over every split).

Method (bench/ratios.py): interleaved rounds in rotating order, untimed warm-up before each
timed run, the headline is the median of the per-round ratios.

Run from the repository root:  .venv/bin/python bench/inference.py --help
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from ratios import TimedRun, interleave, ratio_table

from cxr.classifier import Classifier
from cxr.model import ModelCard, create_model, save_model


def timed(call: Callable[[np.ndarray], object], images: np.ndarray, warmup: int) -> TimedRun:
    """One run: `warmup` untimed batches, then the whole set."""

    def run() -> tuple[int, float]:
        for _ in range(warmup):
            call(images[: min(len(images), 64)])
        start = time.perf_counter()
        call(images)
        return len(images), time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="densenet121", help="timm architecture (untrained)")
    parser.add_argument("--size", type=int, default=160, help="network input side, px")
    parser.add_argument("--images", type=int, default=128, help="images per timed run")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved repetitions, at most")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before each run")
    parser.add_argument("--budget", type=float, default=120, help="seconds before no new round")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size))
    images = images.astype(np.uint8)
    card = ModelCard(arch=args.arch, image_size=args.size, resize="pad", mean=0.5, std=0.25)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        save_model(path, create_model(args.arch, "none"), card)
        nchw = Classifier.load(path, with_guard=False, channels_last=False)
        last = Classifier.load(path, with_guard=False)
    print(
        f"{args.arch}, {args.size} px, fp32, batches of 64, {args.images} images per run, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    paths = {
        "(a) assess, NCHW": timed(nchw.assess, images, args.warmup),
        "(b) assess, channels_last": timed(last.assess, images, args.warmup),
        "(c) features, NCHW": timed(nchw.features, images, args.warmup),
        "(d) features, channels_last": timed(last.features, images, args.warmup),
    }
    rate, per_round = interleave(paths, args.rounds, args.budget)
    names = list(paths)
    print()
    assess = ratio_table(names[:2], rate, per_round, names[0])[names[1]]
    features = ratio_table(names[2:], rate, per_round, names[2])[names[3]]
    difference = np.abs(nchw.assess(images[:8]).logit - last.assess(images[:8]).logit).max()
    print(
        f"\n(b)/(a) = {assess:.2f}, (d)/(c) = {features:.2f}  channels_last vs. NCHW, median "
        f"over rounds; largest |logit difference| {difference:.1e}"
    )


if __name__ == "__main__":
    main()
