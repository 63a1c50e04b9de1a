"""Augmentation of whole batches on the training device: rotation, zoom, shift, flip,
brightness and contrast, drawn per image from a seeded generator.

On the device and per batch, so no CPU-side transform stalls the accelerator, and seeded, so a
run (and a resumed run) sees the same augmented images; under DDP each image is augmented as
one process would augment it.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from cxr.params import Section


class AugmentParams(Section):
    rotation_deg: Annotated[float, Field(ge=0, le=45)]
    zoom: Annotated[float, Field(ge=0, le=0.5)]
    translate: Annotated[float, Field(ge=0, le=0.3)]
    hflip: bool
    brightness: Annotated[float, Field(ge=0, le=0.5)]
    contrast: Annotated[float, Field(ge=0, le=0.5)]


def augment(
    x: torch.Tensor,
    aug: AugmentParams,
    generator: torch.Generator,
    rows: tuple[int, slice] | None = None,
) -> torch.Tensor:
    """Per-image random rotation, zoom, shift, flip, brightness and contrast, for a whole batch.

    x: (B, 1, H, W) floats in [0, 1] on the generator's device. Under DDP, x is one process's
    share of a batch: rows = (size of the whole batch, the share's rows in it). The random
    draws are made for the whole batch and the share's rows kept, so each image is augmented
    the same however many processes train.
    """
    n, keep = rows if rows is not None else (x.shape[0], slice(None))

    def draw() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device)[keep]

    def uniform(half_width: float) -> torch.Tensor:
        return (2 * draw() - 1) * half_width

    b = x.shape[0]
    angle = uniform(math.radians(aug.rotation_deg))
    scale = 1 + uniform(aug.zoom)
    flip = torch.ones(b, device=x.device)
    if aug.hflip:
        flip = torch.where(draw() < 0.5, -1.0, 1.0)
    shift_x, shift_y = 2 * uniform(aug.translate), 2 * uniform(aug.translate)
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1 + uniform(aug.contrast)).view(b, 1, 1, 1)
    brightness = uniform(aug.brightness).view(b, 1, 1, 1)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)
