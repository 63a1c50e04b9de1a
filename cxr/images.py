"""Decoding any X-ray file into the square grayscale array the network sees.

Training (through the preprocess stage) and inference on a new image both go through
`load_square`, so a model always sees its inputs prepared the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["pad", "crop", "stretch"]
Intensity = Literal["raw", "equalize"]

_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message names the file."""


@dataclass(frozen=True)
class SquareGeometry:
    """Where a point of the original image lands in the square: x' = x * scale + offset_x."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    resized_width: int
    resized_height: int
    size: int

    def map_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Map a box given in original pixels, clipped to the square's side."""
        xs = np.clip(np.array([x0, x1]) * self.scale_x + self.offset_x, 0, self.size)
        ys = np.clip(np.array([y0, y1]) * self.scale_y + self.offset_y, 0, self.size)
        return int(np.floor(xs[0])), int(np.floor(ys[0])), int(np.ceil(xs[1])), int(np.ceil(ys[1]))


def square_geometry(width: int, height: int, size: int, mode: ResizeMode) -> SquareGeometry:
    """The resize-and-place that turns a width x height image into a size x size square."""
    if mode == "stretch":
        return SquareGeometry(size / width, size / height, 0.0, 0.0, size, size, size)
    scale = size / (max(width, height) if mode == "pad" else min(width, height))
    resized_w, resized_h = max(1, round(width * scale)), max(1, round(height * scale))
    offset_x, offset_y = (size - resized_w) // 2, (size - resized_h) // 2
    return SquareGeometry(
        resized_w / width, resized_h / height, offset_x, offset_y, resized_w, resized_h, size
    )


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, read from the header without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES:
                width, height = height, width
            return width, height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: {_reason(err)}") from None


def load_square(
    path: Path | IO[bytes], size: int, mode: ResizeMode, intensity: Intensity = "raw"
) -> np.ndarray:
    """Decode an image file (a path, or an open binary file such as an uploaded one, whose
    `name` the errors quote) once into a size x size uint8 grayscale array.

    Handles every JPEG/PNG mode (RGB, RGBA, palette, 16-bit, 1-bit) and EXIF orientation.
    Large JPEGs are decoded at a reduced DCT scale (draft mode), which is several times faster
    than a full decode and loses nothing once the image is shrunk to the network's size.
    `intensity="equalize"` equalizes each image's histogram, which removes the exposure and
    contrast differences between X-ray machines and settings before the network sees them.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES:
                width, height = height, width
            if img.format == "JPEG":
                img.draft("L", (size, size))
            upright = ImageOps.exif_transpose(img)
            gray = to_grayscale(upright)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        where = path if isinstance(path, (str, Path)) else getattr(path, "name", "image")
        raise ImageDecodeError(f"{where}: {_reason(err)}") from None
    return place_in_square(gray, square_geometry(width, height, size, mode), intensity)


def to_grayscale(img: Image.Image) -> Image.Image:
    """8-bit grayscale; deeper images are stretched from their own min to max."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else pixels * 0
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    return img if img.mode == "L" else img.convert("L")


def place_in_square(
    gray: Image.Image, geometry: SquareGeometry, intensity: Intensity = "raw"
) -> np.ndarray:
    resized = gray.resize(
        (geometry.resized_width, geometry.resized_height), Image.Resampling.BILINEAR
    )
    if intensity == "equalize":  # before padding, so the black border does not count
        resized = ImageOps.equalize(resized)
    canvas = Image.new("L", (geometry.size, geometry.size), 0)
    canvas.paste(resized, (int(geometry.offset_x), int(geometry.offset_y)))
    return np.asarray(canvas, dtype=np.uint8)


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, Image.UnidentifiedImageError) or "cannot identify" in text:
        return "not a readable image file"
    return text
