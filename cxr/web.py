"""`pneumonia-web`: a page where a clinician uploads chest X-rays and sees, for each, the
probability, the class, the Grad-CAM overlay beside the image the network saw, or the input
guard's warning in place of a diagnosis; and the same as JSON for scripts.

FastAPI (with uvicorn, both already installed with MLflow) rather than Gradio: the JSON API
is the product for scripts and is documented by FastAPI's OpenAPI page at /docs, the page is
one small HTML file under our control (what it says, and that it hides the diagnosis of a
flagged image), and the server is the same ASGI stack `mlflow models serve` runs.

An upload is the raw request body (`curl --data-binary @xray.jpeg`), read in memory up to
`--max-mb` and never written to disk (a multipart form would be spooled to a temporary file).
What it decodes to is bounded too (`cxr.images`): an image over `MAX_PIXELS` gets a 413 naming
its size and the limit before any pixel is decoded, and at most `MAX_CONCURRENT_DECODES`
uploads are decoded at once. Requests are served concurrently; the model itself runs one
request at a time under a lock, since Grad-CAM hooks the network's layers while it computes a
map.
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
from dataclasses import asdict
from pathlib import Path
from urllib.parse import unquote

import mlflow
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from cxr.classifier import Classifier, decide
from cxr.explain import CAM_METHODS, compute_cams, resolve_target_layer
from cxr.figures import overlay
from cxr.images import ImageDecodeError, ImageTooLargeError
from cxr.tracking import tracking_uri

MEGABYTE = 1024 * 1024
# How much of an upload past the limit is read and dropped so that its sender gets the 413
# rather than a reset connection (`read_upload`); reading it costs time, not memory.
DRAIN_BYTES = 256 * MEGABYTE
PAGE = Path(__file__).with_name("web_page.html").read_text()


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it passes `max_bytes`, holding no more than
    that in memory.

    A client that declares its size and waits for `100 Continue` is refused before it sends
    anything. Any other one is already sending the whole body: answering and closing while it
    still arrives makes the kernel reset the connection, and a client busy writing (urllib,
    whose uploads say `Connection: close`) then never reads the answer. So the rest is read and
    dropped first, up to `DRAIN_BYTES` past the limit; a larger body still gets a reset.
    """
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    limit = max_bytes / MEGABYTE
    too_large = HTTPException(
        413,
        f"file too large: over the {limit:.0f} MB limit"
        if size is None
        else f"file too large: {size / MEGABYTE:.1f} MB, the limit is {limit:.0f} MB",
    )
    waits = request.headers.get("expect", "").lower() == "100-continue"
    if size is not None and size > max_bytes and (waits or size > max_bytes + DRAIN_BYTES):
        raise too_large
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= max_bytes:
            body += chunk
        elif received > max_bytes + DRAIN_BYTES:
            break
        else:
            body.clear()
    if received > max_bytes:
        raise too_large
    return bytes(body)


def create_app(
    classifier: Classifier,
    max_bytes: int = 20 * MEGABYTE,
    source: str = "",
    method: str = "gradcam",
    target_layer: str = "",
) -> FastAPI:
    app = FastAPI(title="Chest X-ray pneumonia classifier (research tool)")
    layer = resolve_target_layer(classifier.model, target_layer)
    lock = threading.Lock()

    def assess(name: str, blob: bytes) -> dict:
        if not blob:
            raise HTTPException(400, f"{name}: the file is empty")
        if blob.startswith(b"%PDF"):
            raise HTTPException(
                415, f"{name}: a PDF document, not an image; upload the X-ray as JPEG or PNG"
            )
        buffer = io.BytesIO(blob)
        buffer.name = name  # what a decoding error quotes
        try:
            pixels = classifier.load_image(buffer)[np.newaxis]
        except ImageTooLargeError as err:
            raise HTTPException(413, str(err)) from None
        except ImageDecodeError as err:
            raise HTTPException(422, f"{err} (a JPEG or PNG image is expected)") from None
        with lock:
            (decision,) = decide(classifier, pixels)
            cam = None
            if not decision.warning:  # a heatmap on a non-X-ray would only mislead
                cam = compute_cams(classifier.model, classifier.to_tensor(pixels), method, layer)[0]
        return {
            "file": name,
            **asdict(decision),
            "image_png": png_base64(pixels[0]),
            "overlay_png": None if cam is None else png_base64(overlay(pixels[0], cam)),
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/model")
    def model_info() -> dict:
        """What the page shows about the model it talks to."""
        card = classifier.card
        return {
            "source": source,
            "arch": card.arch,
            "image_size": card.image_size,
            "threshold": classifier.threshold,
            "flip_tta": classifier.flip_tta,
            "ood_threshold": classifier.ood_threshold,
            "max_upload_mb": max_bytes / MEGABYTE,
        }

    @app.post("/api/predict")
    async def predict(request: Request) -> dict:
        """One image as the raw request body; its name may be given in X-Filename."""
        name = unquote(request.headers.get("x-filename", "")) or "upload"
        blob = await read_upload(request, max_bytes)
        # the model runs in a worker thread, so the server keeps accepting requests meanwhile
        return await run_in_threadpool(assess, name, blob)

    return app


def load_classifier(model: Path | None, model_uri: str | None) -> tuple[Classifier, str]:
    """models/model.pt and the files beside it, or a registered MLflow model."""
    if model_uri:
        mlflow.set_tracking_uri(tracking_uri(""))
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().classifier, model_uri
    model = model or Path("models/model.pt")
    if not model.is_file():
        raise SystemExit(f"error: model file {model} not found (run `dvc repro` first)")
    return Classifier.load(model), str(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pneumonia-web", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="model file (default: models/model.pt)")
    source.add_argument(
        "--model-uri", help="a registered MLflow model, e.g. models:/chest-xray-pneumonia@candidate"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-mb", type=float, default=20.0, help="largest upload accepted")
    parser.add_argument("--method", default="gradcam", choices=sorted(CAM_METHODS))
    parser.add_argument(
        "--target-layer", default="", help="module to explain (default: the last feature block)"
    )
    args = parser.parse_args(argv)
    classifier, where = load_classifier(args.model, args.model_uri)
    try:
        app = create_app(
            classifier, int(args.max_mb * MEGABYTE), where, args.method, args.target_layer
        )
    except ValueError as err:
        raise SystemExit(f"error: --target-layer: {err}") from None
    print(f"serving {where} on http://{args.host}:{args.port}/ (JSON API: POST /api/predict)")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
