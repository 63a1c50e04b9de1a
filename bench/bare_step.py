"""What the two training benchmarks share: the train stage's model and step, and the ceiling.

`prepare` builds what the train stage builds (a fresh model, `create_run`, the loss and the
`Numerics`) from params.yaml with the benchmark's architecture, size and batch; `BareStep`
times `train_step` on one random batch already on the device, the ceiling that
train_data_path.py and imagefolder_baseline.py divide by.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cxr.device import autocast_dtype, memory_format, pick_device
from cxr.model import create_model
from cxr.params import ParamsError, load_params
from cxr.training import Numerics, Params, Run, create_run, train_step

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default."""


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; each script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--arch", default="densenet121", help="timm architecture (untrained)")
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
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    parser.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="the rest of the settings"
    )
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --batch must be at least 1, --warmup at least 0")
    return args


@dataclass
class Setup:
    params: Params
    numerics: Numerics
    run: Run
    loss_fn: nn.Module


def prepare(args: argparse.Namespace, mean: float, std: float) -> Setup:
    """A fresh model and run as the train stage makes them, never frozen, on --device."""
    params = load_params(Params, args.params)
    params = params.model_copy(
        update={
            "image_size": args.size,
            "batch_size": args.batch,
            "model": params.model.model_copy(update={"arch": args.arch, "pretrained": "none"}),
            "train": params.train.model_copy(update={"freeze_epochs": 0}),
        }
    )
    try:
        device = pick_device(args.device)
        dtype = autocast_dtype(params.train.precision, device)
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = memory_format(params.runtime.channels_last)
    numerics = Numerics(device, dtype, layout, mean, std)
    torch.manual_seed(params.seed)
    model = create_model(params.model.arch, "none", params.model.drop_rate)
    run = create_run(model, params, numerics, steps_per_epoch=1000, compile=params.runtime.compile)
    # The train stage's loss; the weight's value does not change the speed.
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0, device=device))
    return Setup(params, numerics, run, loss_fn)


def describe(setup: Setup) -> str:
    p, n = setup.params, setup.numerics
    gpu = f" ({torch.cuda.get_device_name(n.device)})" if n.device.type == "cuda" else ""
    layout = "channels_last" if n.memory_format == torch.channels_last else "NCHW"
    dtype = str(n.dtype or torch.float32).removeprefix("torch.")
    return (
        f"device {n.device}{gpu}, {torch.get_num_threads()} torch threads; {p.model.arch}, "
        f"{p.image_size} px, batch {p.batch_size}, {dtype}, {layout}"
        + (", compiled" if p.runtime.compile else "")
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class BareStep:
    """(a): `train_step` on the same random batch, already on the device, every step."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        n, size, device = setup.params.batch_size, setup.params.image_size, setup.numerics.device
        generator = torch.Generator().manual_seed(setup.params.seed)
        x = torch.randn(n, 1, size, size, generator=generator)
        self.x = x.to(device).contiguous(memory_format=setup.numerics.memory_format)
        self.y = (torch.rand(n, generator=generator) < 0.75).float().to(device)

    def step(self) -> None:
        s = self.setup
        train_step(s.run, self.x, self.y, s.loss_fn, s.numerics)

    def __call__(self, steps: int, warmup: int) -> tuple[int, float]:
        """(images, seconds) of `steps` timed steps after `warmup` untimed ones."""
        self.setup.run.model.train()
        for _ in range(warmup):
            self.step()
        sync(self.setup.numerics.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.setup.numerics.device)
        return steps * len(self.y), time.perf_counter() - start
