"""`pneumonia-web` as a user starts it: a real server on a loopback port, its JSON API, bad
uploads, a bounded concurrent load, and nothing written to disk."""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.classifier import Classifier, decide
from cxr.explain import compute_cams, resolve_target_layer
from cxr.figures import overlay
from tests.conftest import LAYER, Server, request_json, start_web


@pytest.fixture(scope="module")
def web(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_web(trained / "models/model.pt", tmp_path_factory.mktemp("web"))


def post(
    url: str, body: bytes | Iterator[bytes], name: str = "", length: int | None = None
) -> tuple[int, dict]:
    """urllib's POST, with `Connection: close`: an iterator is sent chunked unless its length
    is given, and the answer is read only once the whole body is sent."""
    headers = {"Content-Type": "application/octet-stream"} | ({"X-Filename": name} if name else {})
    headers |= {} if length is None else {"Content-Length": str(length)}
    return request_json(f"{url}/api/predict", body, headers)


def post_large(url: str, body: bytes, name: str) -> tuple[int, dict]:
    """A large upload as curl sends one: `Expect: 100-continue` and the headers first, so a
    server that refuses it answers before the body is sent (urllib would send it all, then find
    the connection closed)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/api/predict")
    for header, value in (("Content-Length", len(body)), ("Expect", "100-continue"),
                          ("X-Filename", name)):  # fmt: skip
        connection.putheader(header, str(value))
    connection.endheaders()
    response = connection.getresponse()  # a refusal, or this waits for a body never sent
    return response.status, json.loads(response.read())


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def noise_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (150, 120), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def test_api_answers_like_the_model_with_image_and_heatmap(web: Server, trained: Path):
    classifier = Classifier.load(trained / "models/model.pt")
    layer = resolve_target_layer(classifier.model, LAYER)
    # the tiny model's Grad-CAM is all zero on many images: take one with a map to compare
    for xray in sorted((trained / "data/raw/test/PNEUMONIA").iterdir()):
        pixels = classifier.load_image(xray)
        cam = compute_cams(classifier.model, classifier.to_tensor(pixels[None]), "gradcam", layer)
        if cam.std() > 0 and decide(classifier, pixels[None])[0].in_distribution:
            break
    status, answer = post(web.url, xray.read_bytes(), "child%20chest.jpeg")
    assert status == 200
    (expected,) = decide(classifier, pixels[np.newaxis])
    assert answer["file"] == "child chest.jpeg"
    assert answer["label"] == expected.label and answer["in_distribution"] is True
    assert answer["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert answer["ood_score"] == pytest.approx(expected.ood_score, rel=1e-5)
    assert answer["threshold"] == classifier.threshold and answer["warning"] is None
    np.testing.assert_array_equal(decode_png(answer["image_png"]), pixels)
    np.testing.assert_array_equal(decode_png(answer["overlay_png"]), overlay(pixels, cam[0]))


def test_api_withholds_the_diagnosis_of_a_non_xray(web: Server):
    status, answer = post(web.url, noise_bytes(), "noise.png")
    assert status == 200
    assert answer["in_distribution"] is False and answer["label"] is None
    assert answer["overlay_png"] is None and answer["ood_score"] > answer["ood_threshold"]
    assert answer["warning"].startswith("not like the chest X-rays this model was trained on")


@pytest.mark.parametrize(
    ("name", "body", "status", "message"),
    [
        ("notes.txt", b"patient notes, not an image", 422, "notes.txt: not a readable image file"),
        ("empty.jpeg", b"", 400, "empty.jpeg: the file is empty"),
        ("report.pdf", b"%PDF-1.7\n1 0 obj <<>> endobj\n", 415, "report.pdf: a PDF document"),
        ("huge.jpeg", bytes(50 * 1024 * 1024), 413, "file too large: 50.0 MB, the limit is 20 MB"),
    ],
)
def test_bad_uploads_get_a_4xx_that_says_why_and_the_server_stays_up(
    web: Server, trained: Path, name: str, body: bytes, status: int, message: str
):
    answer_status, answer = (post_large if len(body) > 1024**2 else post)(web.url, body, name)
    assert (answer_status, answer["detail"][: len(message)]) == (status, message)
    xray = sorted((trained / "data/raw/test/NORMAL").iterdir())[0]
    assert post(web.url, xray.read_bytes())[0] == 200


@pytest.mark.parametrize(
    ("chunked", "message"),
    [
        (True, "file too large: over the 20 MB limit"),
        (False, "file too large: 100.0 MB, the limit is 20 MB"),
    ],
)
def test_an_upload_over_the_limit_sent_without_waiting_gets_a_413_not_a_reset(
    web: Server, trained: Path, chunked: bool, message: str
):
    """A streamed upload (no Content-Length) can only be found too large while it is read, and
    a client that does not wait for `100 Continue` sends its whole body regardless: answering
    before it is all read resets the connection under the client, which then never sees the
    answer (100 MB: more than the sockets' buffers hold)."""
    megabyte = 1024 * 1024
    body = itertools.repeat(bytes(megabyte), 100)
    length = None if chunked else 100 * megabyte
    assert post(web.url, body, "huge.jpeg", length) == (413, {"detail": message})
    xray = sorted((trained / "data/raw/test/NORMAL").iterdir())[0]
    assert post(web.url, xray.read_bytes())[0] == 200


def test_a_truncated_jpeg_is_named_and_refused(web: Server, trained: Path):
    xray = sorted((trained / "data/raw/test/NORMAL").iterdir())[0].read_bytes()
    status, answer = post(web.url, xray[: len(xray) // 2], "cut.jpeg")
    assert status == 422
    assert answer["detail"].startswith("cut.jpeg: image file is truncated")


def test_fifty_requests_four_at_a_time_all_answered_alike(web: Server, trained: Path):
    xray = sorted((trained / "data/raw/test/PNEUMONIA").iterdir())[1].read_bytes()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: post(web.url, xray), range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert len({json.dumps(answer, sort_keys=True) for _, answer in results}) == 1


def test_nothing_uploaded_is_written_to_disk(web: Server, trained: Path):
    """Runs after the uploads above (same module server): its folder and TMPDIR stay empty."""
    xray = sorted((trained / "data/raw/test/PNEUMONIA").iterdir())[2].read_bytes()
    big_png = io.BytesIO()  # larger than the 1 MB at which a multipart form would spool to disk
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1200, 1200), dtype=np.uint8)).save(
        big_png, format="PNG"
    )
    assert len(big_png.getvalue()) > 1024 * 1024
    for body in (xray, big_png.getvalue()):
        assert post(web.url, body)[0] == 200
    assert list(web.workdir.rglob("*")) == []
