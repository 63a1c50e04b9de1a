"""Images that are not pediatric chest X-rays, made offline, to measure the input guard.

Each kind is something a real user might upload by mistake, or a chest X-ray the model was
never trained on: photos and pictures that matplotlib ships (a portrait, a logo, a brain MRI
slice, terrain maps), pages of rendered text, noise and blank images, and test X-rays that are
upside down, inverted (a negative) or cropped to a small region. When the model was trained on
the real X-rays, the demo's synthetic chest images are one more kind. Every image is returned
as PNG bytes, so the stage sends it through the model's own decoding, as an upload would be.
"""

from __future__ import annotations

import io
import string

import numpy as np
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cxr.demo import draw_image

KINDS = ("natural", "document", "noise", "flipped", "inverted", "cropped", "synthetic")


def ood_images(
    xrays: np.ndarray, count: int, seed: int, synthetic: bool
) -> list[tuple[str, bytes]]:
    """(kind, PNG bytes) pairs: `count` of each kind; the X-ray kinds transform `xrays`."""
    rng = np.random.default_rng(seed)
    sources = _natural_sources()
    made = {
        "natural": [
            _natural(sources[i % len(sources)], i < len(sources), rng) for i in range(count)
        ],
        "document": [_document(rng) for _ in range(count)],
        "noise": [_noise(i, rng) for i in range(count)],
        "flipped": [x[::-1] for x in xrays[:count]],
        "inverted": [255 - x for x in xrays[:count]],
        "cropped": [_crop(x, rng) for x in xrays[:count]],
    }
    if synthetic:
        made["synthetic"] = [
            draw_image(rng, pneumonia=bool(i % 2), min_side=160, max_side=320)[0]
            for i in range(count)
        ]
    return [(kind, _png(image)) for kind, images in made.items() for image in images]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = np.nanmin(values), np.nanmax(values)
    return np.round((np.nan_to_num(values, nan=low) - low) * 255 / (high - low)).astype(np.uint8)


def _natural_sources() -> list[np.ndarray]:
    """Pictures bundled with matplotlib (no download): RGB, RGBA and single-channel arrays."""
    photos = [
        np.asarray(Image.open(cbook.get_sample_data(name)))
        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
    ]
    with cbook.get_sample_data(
        "s1045.ima.gz"
    ) as file:  # a brain MRI slice, 16-bit, gunzipped by cbook
        mri = np.frombuffer(file.read(), np.uint16).reshape(256, 256)
    terrain = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    bathymetry = cbook.get_sample_data("topobathy.npz")["topo"]
    return [*photos, _to_uint8(mri.astype(float)), _to_uint8(terrain), _to_uint8(bathymetry)]


def _natural(image: np.ndarray, whole: bool, rng: np.random.Generator) -> np.ndarray:
    """The picture itself the first time, then a random crop of 40-90% of each side."""
    if whole:
        return image
    height, width = image.shape[:2]
    h, w = (int(side * rng.uniform(0.4, 0.9)) for side in (height, width))
    top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
    return image[top : top + h, left : left + w]


def _document(rng: np.random.Generator) -> np.ndarray:
    """A page of typed text (words of random letters), light on dark one time in four."""
    width, height = int(rng.integers(300, 700)), int(rng.integers(400, 900))
    dark = rng.random() < 0.25
    page = Image.new("L", (width, height), 20 if dark else int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(10, 24))
    font = ImageFont.load_default(size=size)
    y = int(rng.integers(10, 40))
    while y < height - size:
        words = [
            "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(2, 10))))
            for _ in range(int(rng.integers(3, 12)))
        ]
        draw.text(
            (int(rng.integers(10, 40)), y), " ".join(words), fill=230 if dark else 0, font=font
        )
        y += int(size * rng.uniform(1.3, 2.2))
    return np.asarray(page)


def _noise(index: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform, Gaussian, smooth (blurred) noise, a blank image of one gray, or a gradient."""
    height, width = int(rng.integers(128, 512)), int(rng.integers(128, 512))
    kind = index % 5
    if kind == 0:
        return rng.integers(0, 256, (height, width), dtype=np.uint8)
    if kind == 1:
        return np.clip(rng.normal(128, 50, (height, width)), 0, 255).astype(np.uint8)
    if kind == 2:
        noise = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return _to_uint8(np.asarray(noise.filter(ImageFilter.GaussianBlur(8)), dtype=float))
    if kind == 3:
        return np.full((height, width), int(rng.integers(0, 256)), dtype=np.uint8)
    axis = int(rng.integers(2))
    ramp = np.linspace(0, 255, (height, width)[axis])
    ramp = ramp[:, np.newaxis] if axis == 0 else ramp[np.newaxis, :]
    return np.broadcast_to(ramp, (height, width)).astype(np.uint8)


def _crop(xray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A region of 20-40% of the side from the middle half of the X-ray, enlarged."""
    size = xray.shape[0]
    side = int(size * rng.uniform(0.2, 0.4))
    top, left = (int(rng.integers(size // 4, 3 * size // 4 - side + 1)) for _ in range(2))
    return xray[top : top + side, left : left + side]
