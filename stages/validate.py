"""Check all of params.yaml before any stage works, and stamp it checked.

Each stage validates the sections it reads when it starts; this stage, first in the pipeline,
validates the whole file against every section's schema, so a typo in a key or a bad value for
a later stage (`-S gradcam.method=gradcam+`) stops `dvc repro` and `dvc exp run` before hours
of training rather than after. Its output never changes, so download, the only stage that
depends on it, runs again only for its own reasons: a change to any param or schema re-runs
this check alone.
"""

from __future__ import annotations

from cxr.atomic import atomic_path
from cxr.distill import DistillParams
from cxr.evaluation import EvaluateParams
from cxr.explain import GradcamParams
from cxr.guard import GuardParams
from cxr.members import Members
from cxr.onnx_model import ExportParams
from cxr.params import ImageSize, load_params
from cxr.preprocessing import PreprocessParams
from cxr.sources import DataParams
from cxr.splitting import SplitParams
from cxr.stage import paths, run
from cxr.training import Params as TrainStageParams

STAMP = "params.yaml: every key known and valid\n"


class Params(TrainStageParams):
    """The whole file: the train stage's settings (with its checks across sections) and every
    other section, with no key left over."""

    model_config = TrainStageParams.model_config | {"extra": "forbid"}
    image_size: ImageSize
    data: DataParams
    split: SplitParams
    preprocess: PreprocessParams
    distill: DistillParams
    members: Members
    guard: GuardParams
    evaluate: EvaluateParams
    gradcam: GradcamParams
    export: ExportParams


def main(argv: list[str] | None = None) -> None:
    args = paths(__doc__, "checked", argv=argv)
    load_params(Params)
    with atomic_path(args.checked) as tmp:
        tmp.write_text(STAMP)
    print(f"params.yaml is valid -> {args.checked}")


if __name__ == "__main__":
    run(main)
