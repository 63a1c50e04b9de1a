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

    `auto` uses bf16 only on a GPU that supports it (no loss scaling needed) and fp32 elsewhere:
    on a CPU bf16 is a measured choice (1.5x faster training steps on this AVX2-only CPU,
    bench/cpu_training.py), not a default, because whether its 8-bit mantissa costs accuracy is
    a question for validation. fp16 needs CUDA. A format the device cannot run is an error
    rather than a silent substitute.
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
