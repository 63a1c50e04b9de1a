"""Memory layout on the CPU: the training step in channels_last ÷ the same step in NCHW.

The train stage uses channels_last on CUDA only (`cxr.device.memory_format`); this measures
whether the CPU would gain from it too. Both paths are `cxr.training.train_step` on one random
batch already on the device (bare_step.BareStep), from two identically seeded runs made as the
train stage makes them; one run's model and batch are converted to channels_last.

Method (bench/ratios.py): interleaved rounds in rotating order, untimed warm-up before each
timed run, the headline is the median of the per-round ratios.

Run from the repository root:  .venv/bin/python bench/channels_last.py --help
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from bare_step import BareStep, Setup, arguments, describe, parse, prepare
from ratios import interleave, ratio_table


def channels_last(setup: Setup) -> Setup:
    """The same run with its model and inputs in channels_last."""
    setup.run.model.to(memory_format=torch.channels_last)
    numerics = dataclasses.replace(setup.numerics, memory_format=torch.channels_last)
    return dataclasses.replace(setup, numerics=numerics)


def main() -> None:
    args = parse(arguments(__doc__))
    contiguous = prepare(args, mean=0.5, std=0.25)
    last = channels_last(prepare(args, mean=0.5, std=0.25))
    print(f"{describe(contiguous)}\nuntimed warm-up steps before each timed run: {args.warmup}")
    names = ["(a) train_step, NCHW", "(b) train_step, channels_last"]
    paths = {
        names[0]: partial(BareStep(contiguous), args.steps, args.warmup),
        names[1]: partial(BareStep(last), args.steps, args.warmup),
    }
    rate, per_round = interleave(paths, args.rounds, args.budget)
    print(f"\n{len(per_round[names[0]])} rounds x {args.steps} timed steps per path, interleaved")
    ratio = ratio_table(names, rate, per_round, names[0])[names[1]]
    print(f"\n(b)/(a) = {ratio:.2f}  channels_last vs. NCHW, median over rounds")


if __name__ == "__main__":
    main()
