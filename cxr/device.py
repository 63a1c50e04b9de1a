"""Where the model runs and in which number format: the only device-specific decisions."""

from __future__ import annotations

import torch

from cxr.params import ParamsError


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

    Mixed precision is a CUDA feature here: `auto` uses bf16 where the GPU supports it (no loss
    scaling needed) and fp32 elsewhere; an explicit bf16 or fp16 that the device cannot run is
    an error rather than a silent substitute.
    """
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "fp32" or (precision == "auto" and not bf16_ok):
        return None
    if precision == "auto":
        return torch.bfloat16
    if device.type != "cuda":
        raise ParamsError(f"train.precision: {precision} needs a CUDA device, not {device.type}")
    if precision == "bf16" and not bf16_ok:
        raise ParamsError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    if dtype is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """channels_last on CUDA only, for now.

    It is faster on this CPU too (1.22-1.30x, bench/channels_last.py), but convolutions then run
    other kernels, which round differently: switching the CPU over would change the committed
    demo results, so it waits for the recipe work that re-measures them.
    """
    if channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format
