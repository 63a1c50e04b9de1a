import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxr import images
from cxr.images import (
    ImageDecodeError,
    ImageTooLargeError,
    image_size,
    load_square,
    square_geometry,
)


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth image with distinct corners, so orientation and placement are checkable."""
    ys, xs = np.mgrid[0:height, 0:width]
    return (40 + 150 * xs / width + 60 * ys / height).astype(np.uint8)


def _reference(path: Path, size: int) -> np.ndarray:
    """The straightforward way: full decode, convert to L, stretch to the square."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1"])
def test_every_8bit_mode_becomes_the_same_grayscale(tmp_path: Path, mode: str):
    gray = _gradient(90, 60)
    path = tmp_path / f"x_{mode}.png"
    Image.fromarray(gray, "L").convert(mode).save(path)
    out = load_square(path, 30, "stretch")
    assert out.shape == (30, 30)
    assert out.dtype == np.uint8
    # The reference decodes the same file, so 1-bit (dithered black and white) needs no slack.
    assert np.abs(out.astype(int) - _reference(path, 30).astype(int)).mean() < 8


def test_16bit_png_is_stretched_to_8bit(tmp_path: Path):
    deep = (_gradient(64, 64).astype(np.uint16) * 16).astype(np.uint16)  # 12-bit range
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    out = load_square(path, 64, "stretch")
    assert out.min() == 0
    assert out.max() == 255
    assert np.corrcoef(out.ravel(), deep.ravel())[0, 1] > 0.99


def test_draft_decoding_matches_a_full_pil_decode(tmp_path: Path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(1200, 1000), (900, 1400), (2000, 1600)]):
        pixels = _gradient(w, h) + rng.integers(0, 10, (h, w), dtype=np.uint8)
        path = tmp_path / f"big{i}.jpeg"
        Image.fromarray(pixels, "L").convert("RGB").save(path, quality=90)
        ours = load_square(path, 128, "stretch").astype(int)
        assert np.abs(ours - _reference(path, 128).astype(int)).mean() < 2.0


def test_exif_orientation_is_applied(tmp_path: Path):
    pixels = _gradient(80, 40)
    path = tmp_path / "rotated.jpeg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(pixels, "L").save(path, exif=exif, quality=95)
    assert image_size(path) == (40, 80)
    out = load_square(path, 80, "pad").astype(int)
    upright = np.rot90(pixels, k=-1)
    expected = np.zeros((80, 80), int)
    expected[:, 20:60] = upright
    assert np.abs(out[:, 22:58] - expected[:, 22:58]).mean() < 4


def test_pad_crop_and_stretch_geometry(tmp_path: Path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((50, 100), 200, np.uint8), "L").save(path)
    padded = load_square(path, 40, "pad")
    assert padded[:10].max() == 0 and padded[30:].max() == 0  # black bars above and below
    assert (padded[10:30] == 200).all()
    assert (load_square(path, 40, "crop") == 200).all()
    assert (load_square(path, 40, "stretch") == 200).all()

    pad = square_geometry(100, 50, 40, "pad")
    assert pad.map_box(0, 0, 100, 50) == (0, 10, 40, 30)
    crop = square_geometry(100, 50, 40, "crop")
    assert crop.map_box(25, 0, 75, 50) == (0, 0, 40, 40)
    assert square_geometry(100, 50, 40, "stretch").map_box(50, 25, 100, 50) == (20, 20, 40, 40)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a readable image"),
        (b"this is not an image", "not a readable image"),
    ],
)
def test_unreadable_files_raise_naming_the_file(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "bad.jpeg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=f"bad.jpeg: {reason}"):
        load_square(path, 32, "pad")


def test_truncated_jpeg_raises_naming_the_file(tmp_path: Path):
    path = tmp_path / "cut.jpeg"
    Image.fromarray(_gradient(200, 200), "L").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageDecodeError, match=r"cut\.jpeg"):
        load_square(path, 32, "pad")


def test_equalize_spreads_a_dim_image_over_the_full_range_and_ignores_the_padding(
    tmp_path: Path,
):
    dim = (_gradient(100, 50) // 4).astype(np.uint8)  # an under-exposed film: values 10-62
    path = tmp_path / "dim.png"
    Image.fromarray(dim, "L").save(path)
    raw = load_square(path, 40, "pad")
    equalized = load_square(path, 40, "pad", "equalize")
    assert raw[10:30].max() < 70
    assert equalized[10:30].min() < 10 and equalized[10:30].max() == 255
    assert equalized[:10].max() == 0 and equalized[30:].max() == 0  # the bars stay black
    # Equalization keeps the order of intensities: it only remaps gray levels.
    order = np.argsort(raw[10:30].ravel(), kind="stable")
    assert (np.diff(equalized[10:30].ravel()[order].astype(int)) >= 0).all()
    # Two exposures of the same film come out nearly alike, which is the point of the option.
    brighter = tmp_path / "bright.png"
    Image.fromarray((dim.astype(int) * 3 + 20).astype(np.uint8), "L").save(brighter)
    again = load_square(brighter, 40, "pad", "equalize")
    assert np.abs(again.astype(int) - equalized.astype(int)).mean() < 3


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    at_limit, over = tmp_path / "at_limit.png", tmp_path / "over.png"
    Image.new("L", (100, 100), 90).save(at_limit)
    Image.new("L", (101, 100), 90).save(over)
    assert (load_square(at_limit, 16, "pad") == 90).all()
    message = r"over\.png: image too large: 101 x 100 pixels \(0 megapixels\), the limit is 0 m"
    for read in (lambda path: load_square(path, 16, "pad"), image_size):
        with pytest.raises(ImageTooLargeError, match=message):
            read(over)
    # refused before decoding: the same header, cut where its pixel data would begin
    over.write_bytes(over.read_bytes().partition(b"IDAT")[0] + b"IDAT")
    with pytest.raises(ImageTooLargeError):
        load_square(over, 16, "pad")


def test_cropping_a_long_strip_to_a_square_is_refused_before_resizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Crop scales the short side to the square's, so a 2 x 1000 strip becomes 64 x 32,000 at
    64 px, and a 1 x 40M one would be 224 x 9 billion: refused before any resize."""
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)
    path = tmp_path / "strip.png"
    Image.new("L", (2, 1000), 90).save(path)
    assert load_square(path, 64, "pad").shape == (64, 64)
    with pytest.raises(ImageTooLargeError, match=r"strip\.png: image too elongated: 2 x 1000"):
        load_square(path, 64, "crop")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_are_stretched_band_by_band_exactly_as_one_float64_frame(
    monkeypatch: pytest.MonkeyPatch, mode: str
):
    monkeypatch.setattr(images, "_BAND_PIXELS", 70 * 3 + 5)  # bands of 3 rows, a short last one
    rng = np.random.default_rng(0)
    deep = rng.integers(300, 40_000, (50, 70)).astype(np.uint16)
    img = Image.fromarray(deep) if mode == "I;16" else Image.fromarray(deep).convert(mode)
    frame = deep.astype(np.float64)
    whole = np.round((frame - frame.min()) * (255.0 / (frame.max() - frame.min())))
    np.testing.assert_array_equal(np.asarray(images.to_grayscale(img)), whole.astype(np.uint8))
    flat = Image.fromarray(np.full((50, 70), 1234, np.uint16))
    assert (np.asarray(images.to_grayscale(flat)) == 0).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pils_transpose(tmp_path: Path, orientation: int):
    """The image is made gray before it is turned upright (the cheaper copy); the result must be
    what PIL's exif_transpose then a grayscale conversion give."""
    path = tmp_path / f"turned{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_gradient(60, 40), "L").convert("RGB").save(path, exif=exif)
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img).convert("L")
    expected = np.asarray(upright.resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(load_square(path, 24, "stretch"), expected)


def test_no_more_than_the_bound_of_decodes_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Server threads decode uploads; each one holds a full frame while it does."""
    path = tmp_path / "x.png"
    Image.fromarray(_gradient(40, 40), "L").save(path)
    running, most, guard = 0, 0, threading.Lock()
    convert = images.to_grayscale

    def slow_grayscale(img: Image.Image) -> Image.Image:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with guard:
            running -= 1
        return convert(img)

    monkeypatch.setattr(images, "to_grayscale", slow_grayscale)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: load_square(path, 16, "pad"), range(16)))
    assert most == images.MAX_CONCURRENT_DECODES


def test_a_forked_process_decodes_too(tmp_path: Path):
    """The preprocess stage decodes in a fork()ed Pool, which copies none of the parent's
    decoding threads: a child given the parent's would wait on them forever."""
    path = tmp_path / "x.png"
    Image.fromarray(_gradient(40, 40), "L").save(path)
    expected = load_square(path, 16, "pad")  # the parent's decoding threads now exist
    with multiprocessing.get_context("fork").Pool(1) as pool:
        decoded = pool.apply_async(load_square, (path, 16, "pad")).get(timeout=60)
    np.testing.assert_array_equal(decoded, expected)
