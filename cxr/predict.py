"""`pneumonia-predict`: classify new chest X-rays with a trained model and explain each one.

Every image goes through the preprocessing the model was trained with (read from the model
file), gets a pneumonia probability, the class at the threshold chosen on validation, and a
Grad-CAM overlay, unless the input guard finds it unlike the training X-rays: then it gets a
warning instead of a diagnosis, and no overlay. An unreadable file is reported by name; the
others still run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxr.classifier import Classifier, decide
from cxr.dataset import IMAGE_SUFFIXES
from cxr.explain import CAM_METHODS, compute_cams, resolve_target_layer
from cxr.figures import save_panel
from cxr.images import ImageDecodeError
from cxr.onnx_model import load_onnx

OVERLAY_SUFFIX = "_gradcam.png"


def find_images(paths: list[Path]) -> Iterator[Path]:
    """Files as given; folders searched recursively for X-rays, skipping earlier overlays."""
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.name.endswith(OVERLAY_SUFFIX)
            )
        else:
            yield path


def overlay_path(image: Path, out_dir: Path | None) -> Path:
    return (out_dir or image.parent) / f"{image.stem}{OVERLAY_SUFFIX}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pneumonia-predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--model", type=Path, help="default: models/model.pt, models/model.onnx for --backend onnx"
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: models/model.onnx on onnxruntime, no PyTorch needed (no Grad-CAM overlays)",
    )
    parser.add_argument("--out", type=Path, help="folder for overlays (default: beside each image)")
    parser.add_argument("--no-cam", action="store_true", help="skip the Grad-CAM overlays")
    parser.add_argument("--method", default="gradcam", choices=sorted(CAM_METHODS))
    parser.add_argument(
        "--target-layer", default="", help="module to explain (default: the last feature block)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or Path(f"models/model.{'onnx' if args.backend == 'onnx' else 'pt'}")
    if not args.model.is_file():
        print(f"error: model file {args.model} not found (run `dvc repro` first)", file=sys.stderr)
        return 2
    if args.backend == "onnx":
        classifier = load_onnx(args.model)
        args.no_cam = True  # Grad-CAM needs the network's gradients, which the graph does not keep
    else:
        classifier = Classifier.load(args.model)
    try:
        layer = None if args.no_cam else resolve_target_layer(classifier.model, args.target_layer)
    except ValueError as err:
        print(f"error: --target-layer: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    tta = ", flip TTA" if classifier.flip_tta else ""
    guard = "no input guard" if classifier.ood_threshold is None else "input guard on"
    print(
        f"model {args.model} ({classifier.card.arch}), threshold {classifier.threshold:.4f}{tta}, "
        + guard
    )

    failures = 0
    for path in find_images(args.images):
        try:
            pixels = classifier.load_image(path)[np.newaxis]
        except (ImageDecodeError, FileNotFoundError, IsADirectoryError) as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        (decision,) = decide(classifier, pixels)
        if decision.warning:
            print(f"{path}  OUT OF DISTRIBUTION: {decision.warning}")
            continue
        line = f"{path}  p(pneumonia)={decision.probability:.4f}  {decision.label}"
        if decision.ood_score is not None:
            line += f"  guard {decision.ood_score:.3g} (flags above {decision.ood_threshold:.3g})"
        if layer is not None:
            cam = compute_cams(classifier.model, classifier.to_tensor(pixels), args.method, layer)
            target = overlay_path(path, args.out)
            title = f"{decision.label}  p={decision.probability:.2f}"
            save_panel(target, pixels[0], cam[0], title)
            line += f"  overlay {target}"
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
