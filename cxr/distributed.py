"""Data-parallel training over several processes, started by torchrun.

torchrun starts one process per device and tells each its place through the environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, and where to meet: MASTER_ADDR/PORT). Every
process reads the whole batch order and trains on its share of each batch; gradients are
averaged by `DistributedDataParallel`; rank 0 alone validates and writes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; the defaults are a plain run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates, prints, checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a batch; rows rank, rank + world, ... so shares differ by at
        most one row."""
        return batch[self.rank :: self.world]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over all processes (in place), for the epoch's loss."""
        if self.distributed:
            dist.all_reduce(value)
        return value

    def from_main(self, *values: object) -> tuple:
        """Rank 0's values on every process: the validation figures that decide early stopping
        (every process must stop at the same epoch), and the checkpoint to resume from (which
        only rank 0's machine may hold)."""
        if not self.distributed:
            return values
        shared = list(values)
        dist.broadcast_object_list(shared, src=0)
        return tuple(shared)


ONE_PROCESS = Ranks()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch(processes: int, module: str, argv: list[str]) -> NoReturn:
    """Become torchrun running `python -m module argv` in `processes` processes.

    This process turns into torchrun (exec) rather than waiting on it, so a signal that stops
    the stage (Ctrl-C, DVC, a scheduler) reaches torchrun, which stops its workers. --standalone
    picks a free rendezvous port on localhost, so several runs on one machine do not collide.
    Across machines, call torchrun yourself (docs/scaling.md).
    """
    sys.stdout.flush()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", module, *argv,
    ]  # fmt: skip
    os.execv(sys.executable, command)


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up; outside torchrun, a single process as before.

    NCCL between GPUs (each process takes the GPU of its local rank), gloo between CPU
    processes. The generous timeout covers rank 0 validating while the others wait for it.
    """
    if not launched_by_torchrun():
        return ONE_PROCESS, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=1))
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
