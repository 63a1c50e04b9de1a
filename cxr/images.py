"""Decoding any X-ray file into the square grayscale array the network sees.

Training (through the preprocess stage) and inference on a new image both go through
`load_square`, so a model always sees its inputs prepared the same way.

A file's cost is what it decodes to, not its size: a 110 KB PNG can declare 30,000 x 30,000
pixels. So the header is read first and an image over `MAX_PIXELS` is refused before any pixel
is decoded, deep (16-bit, float) frames are brought to 8 bits without a float copy of the
whole frame, and a process decodes at most `MAX_CONCURRENT_DECODES` images at once. One decode
then stays under about 300 MB (a 50 MP RGB or float frame), and the servers' threads under
twice that together.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["pad", "crop", "stretch"]
Intensity = Literal["raw", "equalize"]

# A chest radiograph is at most ~4300 x 4300 (18 MP: a 43 cm detector at 100 um), usually
# ~3000 x 3000 (9 MP). 50 MP leaves room for any scan while a decoded frame stays under 200 MB
# even at 4 bytes a pixel (RGB, 32-bit, float), which is what the bound is for.
MAX_PIXELS = 50_000_000
# PIL's own check, aligned with ours for every PIL decode in a process that imports this module:
# it warns above MAX_PIXELS (which `load_square` refuses by name) and refuses above twice that,
# in `Image.open`, before the size is ours to read.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The page's server and `mlflow models serve` answer requests in many threads; `load_square`
# decodes in this many threads of its own instead. That bounds the frames held at once, and
# keeps their memory in as many malloc arenas: glibc gives each thread its own and keeps what a
# thread frees for that thread, so 8 request threads decoding even 2 at a time peaked at 3 times
# the memory of 2 decoding threads (8 uploads of a 36 MP 16-bit PNG: +800 MB against +250 MB).
MAX_CONCURRENT_DECODES = 2
_decoders: ThreadPoolExecutor


def _start_decoders() -> None:
    global _decoders
    _decoders = ThreadPoolExecutor(MAX_CONCURRENT_DECODES, thread_name_prefix="decode")


_start_decoders()
if hasattr(os, "register_at_fork"):  # a forked child (a Pool of decoders) has no such threads
    os.register_at_fork(after_in_child=_start_decoders)

_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_BAND_PIXELS = 1 << 20  # pixels a deep frame is stretched at a time: an 8 MB float64 scratch


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message names the file."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than `MAX_PIXELS`, refused before its pixels are decoded; the
    message names the file, its size and the limit."""


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


@contextmanager
def _open(path: Path | IO[bytes]) -> Iterator[Image.Image]:
    """The image with its header read and its pixel count checked, nothing decoded yet; any
    failure inside the block, decoding included, becomes an ImageDecodeError naming the file."""
    where = _name(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{where}: image too large: {width} x {height} pixels "
                    f"({width * height / 1e6:.0f} megapixels), {_limit()}"
                )
            yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own refusal (the warning too, where warnings are errors), of a header it does
        # not let us read: all it tells is that the image is over its bound
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or MAX_PIXELS) / 1e6
        raise ImageTooLargeError(
            f"{where}: image too large: over {pil_limit:.0f} megapixels, {_limit()}"
        ) from None
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{where}: {_reason(err)}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, read from the header without decoding the pixels; an image
    over `MAX_PIXELS` is refused here too, as `load_square` would refuse it."""
    with _open(path) as img:
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES:
            width, height = height, width
        return width, height


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

    Raises ImageTooLargeError before decoding an image over `MAX_PIXELS`, or one so elongated
    that cropping it to a square would first resize it past that (crop of a 1 x 40M strip).
    Runs in one of the `MAX_CONCURRENT_DECODES` decoding threads, whichever thread calls it.
    """
    return _decoders.submit(_load_square, path, size, mode, intensity).result()


def _load_square(
    path: Path | IO[bytes], size: int, mode: ResizeMode, intensity: Intensity
) -> np.ndarray:
    with _open(path) as img:
        width, height = img.size
        resized = square_geometry(width, height, size, mode)  # the same area, EXIF or not
        if resized.resized_width * resized.resized_height > MAX_PIXELS:
            raise ImageTooLargeError(
                f"{_name(path)}: image too elongated: {width} x {height} pixels would be "
                f"resized to {resized.resized_width} x {resized.resized_height} to {mode} it, "
                + _limit()
            )
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)  # decodes a PNG (eXIf may follow)
        if orientation in _SWAPS_SIDES:
            width, height = height, width
        if img.format == "JPEG":
            img.draft("L", (size, size))
        gray = to_grayscale(img)  # before rotating: an 8-bit frame is the cheaper copy
        if orientation in _UPRIGHT:
            gray = gray.transpose(_UPRIGHT[orientation])
        return place_in_square(gray, square_geometry(width, height, size, mode), intensity)


def to_grayscale(img: Image.Image) -> Image.Image:
    """8-bit grayscale; deeper images are stretched from their own min to max, a band of rows
    at a time, so a 16-bit frame never has a float64 copy (8 bytes a pixel) of its own."""
    if img.mode not in _DEEP_MODES:
        return img if img.mode == "L" else img.convert("L")
    width, height = img.size
    rows = max(1, _BAND_PIXELS // width)
    tops = range(0, height, rows)

    def band(top: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, width, min(height, top + rows))), dtype=np.float64)

    extremes = [(float(b.min()), float(b.max())) for b in map(band, tops)]
    low, high = min(lo for lo, _ in extremes), max(hi for _, hi in extremes)
    gray = np.zeros((height, width), np.uint8)
    if high > low:
        for top in tops:
            gray[top : top + rows] = np.round((band(top) - low) * (255.0 / (high - low)))
    return Image.fromarray(gray)


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


def _limit() -> str:
    return f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels"


def _name(path: Path | IO[bytes]) -> str:
    """What an error calls the file: its path, or an open file's `name`."""
    return str(path) if isinstance(path, (str, Path)) else getattr(path, "name", "image")


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, Image.UnidentifiedImageError) or "cannot identify" in text:
        return "not a readable image file"
    return text
