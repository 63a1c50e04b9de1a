"""What a training step costs on this CPU, and which settings make it cheaper.

Every path is `cxr.training.train_step` on one random batch already in memory, from identically
seeded runs made as the train stage makes them (bare_step.prepare), differing in one setting:

  (a) NCHW, fp32, --batch, torch's default threads: the reference
  (b) channels_last (runtime.channels_last)
  (c) channels_last + bf16 autocast (train.precision allows it on CUDA only: this measures why)
  (d) channels_last, one thread (runtime.threads=1, what parallel `dvc queue` workers get)
  (e) channels_last, half the batch
  (f) channels_last, twice the batch
  (g) validation: channels_last forward in eval mode, no gradients, twice the batch (what the
      train stage's per-epoch validation costs per image)

Method (bench/ratios.py): interleaved rounds in rotating order, untimed warm-up steps before
each timed run, the headline is each path's median per-round ratio to (a).

--profile N then runs N batches of the train stage's own epoch code (`train_one_epoch`:
gather, augment, normalize, step) in path (b)'s setting under torch.profiler, and prints the
operators that take the time.

Run from the repository root:  .venv/bin/python bench/cpu_training.py --size 128 --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from bare_step import BareStep, Setup, arguments, describe, parse, prepare, sync
from ratios import interleave, ratio_table

from cxr.batches import DeviceData
from cxr.training import predict_logits, train_groups_of_epoch, train_one_epoch


def variant(
    args: argparse.Namespace,
    memory_format: torch.memory_format,
    dtype: torch.dtype | None = None,
    batch: int = 0,
) -> Setup:
    """A fresh run as the train stage makes it, with one setting changed."""
    setup = prepare(argparse.Namespace(**{**vars(args), "batch": batch or args.batch}), 0.5, 0.25)
    setup.run.model.to(memory_format=memory_format)
    numerics = dataclasses.replace(setup.numerics, memory_format=memory_format, dtype=dtype)
    return dataclasses.replace(setup, numerics=numerics)


def with_threads(threads: int, timed: BareStep, steps: int, warmup: int) -> tuple[int, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return timed(steps, warmup)
    finally:
        torch.set_num_threads(before)


def validation(setup: Setup, steps: int, warmup: int) -> tuple[int, float]:
    """(images, seconds) of forward-only batches as `cxr.training.validate` runs them."""
    n, size = setup.params.batch_size, setup.params.image_size
    data = DeviceData(torch.randint(0, 256, (n, size, size), dtype=torch.uint8), torch.zeros(n))
    for _ in range(warmup):
        predict_logits(setup.run.model, data, setup.numerics, n)
    sync(setup.numerics.device)
    start = time.perf_counter()
    for _ in range(steps):
        predict_logits(setup.run.model, data, setup.numerics, n)
    sync(setup.numerics.device)
    return n * steps, time.perf_counter() - start


def profile(setup: Setup, batches: int) -> None:
    """The train stage's epoch code under torch.profiler: where one epoch's time goes."""
    p = setup.params
    n = batches * p.batch_size
    generator = torch.Generator().manual_seed(0)
    data = DeviceData(
        torch.randint(0, 256, (n, p.image_size, p.image_size), generator=generator).byte(),
        (torch.rand(n, generator=generator) < 0.75).float(),
    )
    train_groups_of_epoch(setup.run.model, p.epochs, p.train)
    train_one_epoch(setup.run, data, p, setup.numerics, setup.loss_fn, epoch=p.epochs)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_one_epoch(setup.run, data, p, setup.numerics, setup.loss_fn, epoch=p.epochs)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of train_one_epoch, {batches} batches ({describe(setup)}):")
    print(f"{'operator':<44} {'self CPU %':>10} {'calls':>7}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"{e.key[:44]:<44} {100 * e.self_cpu_time_total / total:>9.1f}% {e.count:>7}")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--profile", type=int, default=0, help="batches to profile afterwards")
    args = parse(parser)
    last, half = torch.channels_last, max(1, args.batch // 2)
    setups = {
        "(a) NCHW fp32": variant(args, torch.contiguous_format),
        "(b) channels_last": variant(args, last),
        "(c) channels_last bf16": variant(args, last, dtype=torch.bfloat16),
        "(d) channels_last 1 thread": variant(args, last),
        f"(e) channels_last batch {half}": variant(args, last, batch=half),
        f"(f) channels_last batch {2 * args.batch}": variant(args, last, batch=2 * args.batch),
        "(g) validation forward": variant(args, last, batch=2 * args.batch),
    }
    names = list(setups)
    print(f"{describe(setups[names[0]])}\nuntimed warm-up steps per timed run: {args.warmup}")
    paths = {name: partial(BareStep(s), args.steps, args.warmup) for name, s in setups.items()}
    paths[names[3]] = partial(with_threads, 1, BareStep(setups[names[3]]), args.steps, args.warmup)
    paths[names[6]] = partial(validation, setups[names[6]], args.steps, args.warmup)
    rate, per_round = interleave(paths, args.rounds, args.budget)
    print(f"\n{len(per_round[names[0]])} rounds x {args.steps} timed steps per path, interleaved")
    ratio_table(names, rate, per_round, names[0])
    if args.profile:
        profile(setups[names[1]], args.profile)


if __name__ == "__main__":
    main()
