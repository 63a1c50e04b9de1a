"""Where the model runs and in which number format: the only device-specific decisions."""

from __future__ import annotations

import os

import torch

from cxr.params import ParamsError
from cxr.stage import queue_workers


def pick_device(choice: str) -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("runtime.device: cuda was asked for but no CUDA device is available")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("runtime.device: mps was asked for but MPS is not available")
    return torch.device(choice)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision`, or None for plain fp32.

    `auto` uses bf16 only on a GPU that supports it (no loss scaling needed) and fp32 elsewhere:
    on a CPU bf16 is a measured choice per network and per CPU, not a default
    (bench/cpu_training.py: DenseNet121's training step 2x faster on one 2-core machine, every
    network about 10x slower on an AMD EPYC with AVX2 only), and whether its 8-bit mantissa
    costs accuracy is a question for validation. fp16 needs CUDA. A format the device cannot
    run is an error rather than a silent substitute.
    """
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "fp32" or (precision == "auto" and not cuda_bf16):
        return None
    if precision == "auto" or (precision == "bf16" and (cuda_bf16 or device.type == "cpu")):
        return torch.bfloat16
    if precision == "bf16":
        raise ParamsError(f"train.precision: bf16 is not supported on this {device.type} device")
    if device.type != "cuda":
        raise ParamsError(f"train.precision: fp16 needs a CUDA device, not {device.type}")
    return torch.float16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    if dtype is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def memory_format(channels_last: bool) -> torch.memory_format:
    """channels_last (NHWC) runs faster convolution kernels on CUDA and on this CPU as well
    (1.27x for DenseNet121's training step at 128 px, bench/cpu_training.py)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def local_processes() -> int:
    """Training processes on this machine (torchrun's --nproc-per-node), 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def memory_budget(configured_gb: float, device: torch.device) -> int:
    """Bytes of images the train stage may hold on `device` (`runtime.memory_budget_gb`, in
    decimal GB).

    0 = half of the device's memory, leaving the rest to the model, its activations and the
    optimizer: a GPU's own memory, or on a CPU the machine's memory shared by the training
    processes on it (each holds its own copy of the splits).
    """
    if configured_gb:
        return int(configured_gb * 1e9)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    if device.type == "mps":
        return torch.mps.recommended_max_memory() // 2
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return physical // 2 // local_processes()


def use_cpu_threads(configured: int) -> int:
    """Set torch's CPU threads (`runtime.threads`; 0 = this process's share of the cores).

    torch starts one thread per core in every process, so two processes on a 2-core machine
    run 4 threads that evict each other's caches: two queued experiments trained at 4 images/s
    each where one alone did 30. The share divides the cores among the training processes on
    this machine and the `dvc queue` workers running now.
    """
    sharing = local_processes() * queue_workers()
    threads = configured or max(1, len(os.sched_getaffinity(0)) // sharing)
    torch.set_num_threads(threads)
    return threads
