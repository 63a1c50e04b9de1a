"""Files that cost far more to decode than to send, sent to everything that decodes a caller's
file: the page's server, `mlflow models serve`, `pneumonia-predict` and the preprocess stage.
Each must get a per-file error or a bounded answer, and the servers must stay up.

The hostile files: a 30,000 x 30,000 1-bit PNG (110 KB; 900 MB once decoded), a 9,000 x 9,000
16-bit PNG (160 KB; 2.2 GB at its peak when it was widened to float64) and a truncated JPEG.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.predict import main as predict
from cxr.preprocessing import decode_all
from tests.conftest import (
    LAYER,
    free_port,
    request_json,
    run_stage_in_process,
    serve,
    tool_env,
)

# PIL warns of an image over 50 MP as it opens it; load_square then refuses it by name
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
NAME = "chest-xray-pneumonia"  # params.yaml mlflow.registered_model
LIMIT = "the limit is 50 megapixels"
# file -> (the page's status, what the error says after "<file>: ")
EXPECTED = {
    "huge_1bit.png": (413, f"image too large: over 100 megapixels, {LIMIT}"),
    "deep_16bit.png": (413, f"image too large: 9000 x 9000 pixels (81 megapixels), {LIMIT}"),
    "cut.jpeg": (422, "image file is truncated"),
}


def blank_png(width: int, height: int, bit_depth: int) -> bytes:
    """A black grayscale PNG of any size, compressed a row at a time: PIL would first build the
    whole frame (900 MB for 30,000 x 30,000, since it keeps even a 1-bit pixel in a byte)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = bytes(1 + (width * bit_depth + 7) // 8)  # a filter byte, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # 0: grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def deep_png(side: int) -> bytes:
    """A 16-bit gradient under the pixel limit, so it is decoded: at 6,000 a side (36 MP) the
    frame is 72 MB, and was 1 GB at its peak as float64."""
    ramp = np.arange(side, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.add.outer(ramp * 3, ramp * 4)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def cut_jpeg() -> bytes:
    buffer = io.BytesIO()
    ramp = np.add.outer(np.arange(300), np.arange(300)).astype(np.uint8)
    Image.fromarray(ramp).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    made = {
        "huge_1bit.png": blank_png(30_000, 30_000, 1),
        "deep_16bit.png": blank_png(9_000, 9_000, 16),
        "cut.jpeg": cut_jpeg(),
    }
    assert max(map(len, made.values())) < 200_000  # far under any upload limit
    return made


@pytest.fixture(scope="module")
def xray(trained: Path) -> bytes:
    return sorted((trained / "data/raw/test/NORMAL").iterdir())[0].read_bytes()


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


@pytest.fixture(scope="module")
def page(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`pneumonia-web` (url, process id): conftest's start_web, keeping the process to read
    its memory."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "pneumonia-web"),
               "--model", str(trained / "models/model.pt"), "--port", str(port),
               "--target-layer", LAYER]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    process = serve(command, url, "/api/model", cwd=tmp_path_factory.mktemp("page"))
    try:
        yield url, process.pid
        assert process.poll() is None, "the server died"
    finally:
        process.terminate()
        process.wait(timeout=30)


def post(url: str, body: bytes, name: str = "") -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream"} | ({"X-Filename": name} if name else {})
    return request_json(f"{url}/api/predict", body, headers)


def test_the_page_refuses_each_hostile_file_by_name_and_stays_up(
    page: tuple[str, int], hostile: dict[str, bytes], xray: bytes
):
    url, pid = page
    assert post(url, xray)[0] == 200
    before = memory_mb(pid, "VmRSS")
    for name, body in hostile.items():
        status, message = EXPECTED[name]
        answer_status, answer = post(url, body, name)
        assert answer_status == status and answer["detail"].startswith(f"{name}: {message}")
        assert post(url, xray)[0] == 200
    assert memory_mb(pid, "VmHWM") - before < 100  # refused from their headers, not decoded


def test_concurrent_deep_uploads_are_decoded_a_few_at_a_time(page: tuple[str, int]):
    """Eight uploads of a 36 MP 16-bit PNG at once, each ~130 MB to decode (the 72 MB frame,
    its 8-bit copy, a band): decoded in the request threads they took +930 MB, two at a time
    in those threads +680 MB (glibc keeps the memory a thread frees for that thread), and in
    the two decoding threads +250 MB."""
    url, pid = page
    deep = deep_png(6000)
    before = memory_mb(pid, "VmRSS")
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: post(url, deep, f"deep{i}.png"), range(8)))
    assert [status for status, _ in results] == [200] * 8
    assert memory_mb(pid, "VmHWM") - before < 600


def test_decoding_a_deep_image_makes_no_float64_frame(tmp_path: Path):
    """In a fresh process, whose VmHWM is its own (ru_maxrss would count the RSS of the pytest
    process it was forked from)."""
    path = tmp_path / "deep.png"
    path.write_bytes(deep_png(6000))
    script = (
        "import sys; from pathlib import Path; from cxr.images import load_square\n"
        "status = Path('/proc/self/status')\n"
        "def peak(): return int(status.read_text().split('VmHWM:')[1].split()[0]) / 1024\n"
        "before = peak(); load_square(Path(sys.argv[1]), 224, 'pad'); print(peak() - before)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 300  # MB; ~130 band by band, ~900 through a float64 frame


def test_the_cli_reports_each_hostile_file_and_classifies_the_rest(
    trained: Path,
    hostile: dict[str, bytes],
    xray: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    for name, body in hostile.items():
        (tmp_path / name).write_bytes(body)
    good = tmp_path / "good.jpeg"
    good.write_bytes(xray)
    model = trained / "models/model.pt"
    code = predict([*(str(tmp_path / n) for n in hostile), str(good), "--model", str(model)])
    out = capsys.readouterr()
    assert code == 1
    for name, (_, message) in EXPECTED.items():
        assert f"error: {tmp_path / name}: {message}" in out.err
    assert f"{good}  " in out.out


def test_preprocessing_rejects_them_like_any_corrupt_file(
    hostile: dict[str, bytes], tmp_path: Path
):
    for name, body in hostile.items():
        (tmp_path / name).write_bytes(body)
    Image.new("L", (40, 30), 100).save(tmp_path / "good.png")
    decoded = decode_all(tmp_path, [*hostile, "good.png"], 32, "pad", workers=2)  # forked
    for result, (name, (_, message)) in zip(decoded, EXPECTED.items(), strict=False):
        assert result.pixels is None and result.error.startswith(f"{tmp_path / name}: {message}")
    assert decoded[-1].error == "" and decoded[-1].pixels.shape == (32, 32)


@pytest.fixture(scope="module")
def served(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve` of the model the evaluate stage registers (as in test_serving)."""
    tmp = tmp_path_factory.mktemp("served")
    folder = tmp / "project"
    shutil.copytree(trained, folder)
    env = tool_env(tmp)
    run_stage_in_process(folder, "evaluate", env["MLFLOW_TRACKING_URI"])
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve",
               "-m", f"models:/{NAME}@candidate", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    process = serve(command, url, "/ping", cwd=folder, env=env)
    try:
        yield url
        assert process.poll() is None, "the server died"
    finally:
        process.terminate()
        process.wait(timeout=30)


def invoke(url: str, files: list[bytes]) -> tuple[int, dict]:
    rows = [[base64.b64encode(blob).decode("ascii")] for blob in files]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    return request_json(f"{url}/invocations", body, {"Content-Type": "application/json"})


@pytest.mark.slow  # `mlflow models serve` in its own environment
def test_the_served_model_answers_each_hostile_file_in_its_own_row(
    served: str, hostile: dict[str, bytes], xray: bytes
):
    status, answer = invoke(served, [*hostile.values(), xray])
    assert status == 200
    *refused, good = answer["predictions"]
    for i, (row, (_, message)) in enumerate(zip(refused, EXPECTED.values(), strict=True)):
        assert row["error"].startswith(f"image {i}: {message}") and row["probability"] is None
    assert good["error"] is None and 0 <= good["probability"] <= 1
    assert invoke(served, [xray])[0] == 200
