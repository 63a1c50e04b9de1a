"""Inference on the CPU: onnxruntime vs eager PyTorch, and the MLflow server under load.

Paths, all on the same trained model (models/model.pt and the export stage's models/model.onnx)
and the same uint8 test images from data/processed, normalization included:

  (a) eager PyTorch, batch 1            (b) onnxruntime, batch 1
  (c) eager PyTorch, batch 32           (d) onnxruntime, batch 32

interleaved over rounds (bench/ratios.py); the headlines are (b)/(a) and (d)/(c).

--serve URL then sends 50 requests of one encoded test image each, 4 at a time, to a running
`mlflow models serve` (docs/deploy.md) and prints requests/s and the p50/p95 latency next to
the bare network's batch-1 forward time measured above, all in one run.

Run from the repository root after `dvc repro`:  .venv/bin/python bench/deploy.py
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxr

from ratios import interleave, ratio_table

from cxr.classifier import Classifier
from cxr.onnx_model import load_onnx
from cxr.processed import load_split
from cxr.serving import encode_png


def timed(predict, images: np.ndarray, batch: int, steps: int):
    def run() -> tuple[int, float]:
        start = time.perf_counter()
        for i in range(steps):
            predict(images[(i * batch) % (len(images) - batch) :][:batch])
        return steps * batch, time.perf_counter() - start

    return run


def load_test(url: str, image: np.ndarray, requests: int, concurrency: int) -> list[float]:
    """Seconds per request, each sending one PNG-encoded image; any failure raises."""
    payload = base64.b64encode(encode_png(image)).decode("ascii")
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[payload]]}}).encode()

    def one(_: int) -> float:
        start = time.perf_counter()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["predictions"][0]["error"] is None
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(requests)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--steps", type=int, default=20, help="batches per path per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120)
    parser.add_argument("--serve", default="", help="URL of a running `mlflow models serve`")
    args = parser.parse_args()

    torch_model = Classifier.load(args.models / "model.pt")
    onnx_model = load_onnx(args.models / "model.onnx")
    images = np.asarray(load_split("test", args.processed).images)
    print(
        f"{torch_model.card.arch}, {torch_model.card.image_size} px, {len(images)} test images, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime default"
    )
    paths = {
        "(a) torch batch 1": timed(torch_model.predict_proba, images, 1, args.steps),
        "(b) onnxruntime batch 1": timed(onnx_model.predict_proba, images, 1, args.steps),
        "(c) torch batch 32": timed(torch_model.predict_proba, images, 32, max(1, args.steps // 8)),
        "(d) onnxruntime batch 32": timed(
            onnx_model.predict_proba, images, 32, max(1, args.steps // 8)
        ),
    }
    for path in paths.values():  # warm-up: first calls allocate and pick kernels
        path()
    rate, per_round = interleave(paths, args.rounds, args.budget)
    names = list(paths)
    print()
    ratio_table(names[:2], rate, per_round, names[0])
    ratio_table(names[2:], rate, per_round, names[2])
    if args.serve:
        url = f"{args.serve.rstrip('/')}/invocations"
        load_test(url, images[0], 8, 4)  # warm-up, untimed
        started = time.perf_counter()
        latencies = load_test(url, images[0], 50, 4)
        wall = time.perf_counter() - started
        p50, p95 = np.percentile(latencies, [50, 95])
        forward_ms = 1000 / rate[names[0]]
        print(
            f"\nmlflow models serve, 50 requests x 1 image, 4 at a time: {50 / wall:.1f} "
            f"requests/s, latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
            f"(median {statistics.median(latencies) * 1000:.0f} ms); bare batch-1 forward "
            f"{forward_ms:.0f} ms: p95 / forward = {p95 * 1000 / forward_ms:.1f}"
        )


if __name__ == "__main__":
    main()
