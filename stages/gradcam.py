"""Grad-CAM heatmaps for test images, and scores that say whether they can be trusted.

Renders true/false positives/negatives as PNGs plus a montage. Scores localization against the
demo generator's lesion boxes (pointing game, energy in box), faithfulness with the grad-cam
package's ROAD metrics, and a weight-randomization sanity check, on a seeded sample of test
images drawn from both classes.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from cxr import tracking
from cxr.atomic import atomic_path, write_json
from cxr.classes import CLASSES
from cxr.classifier import Classifier
from cxr.device import pick_device, use_cpu_threads
from cxr.explain import (
    GradcamParams,
    compute_cams,
    energy_in_box,
    faithfulness,
    pointing_game_hit,
    random_pointing_rate,
    randomization_check,
    resolve_target_layer,
)
from cxr.figures import save_montage, save_panel
from cxr.images import square_geometry
from cxr.params import ParamsError, Seed, StageParams, load_params
from cxr.processed import ProcessedSplit, load_split
from cxr.sampling import scoring_sample
from cxr.stage import paths, require, run


class Params(StageParams):
    seed: Seed
    gradcam: GradcamParams


OUTCOMES = ("TP", "FN", "FP", "TN")
RANDOMIZATION_SEEDS = (0, 1, 2)


def outcome_of(label: str, predicted: str) -> str:
    correct = "T" if label == predicted else "F"
    return correct + ("P" if predicted == "PNEUMONIA" else "N")


def select_cases(predictions: pd.DataFrame, per_outcome: int) -> pd.DataFrame:
    """The most confident cases of each outcome: the clearest successes and worst mistakes."""
    table = predictions.assign(
        outcome=[
            outcome_of(a, b)
            for a, b in zip(predictions["label"], predictions["predicted"], strict=True)
        ],
        confidence=(predictions["probability"] - 0.5).abs(),
    )
    table = table.sort_values(["confidence", "path"], ascending=[False, True])
    chosen = [table[table["outcome"] == outcome].head(per_outcome) for outcome in OUTCOMES]
    return pd.concat(chosen)


def lesion_boxes(lesions: pd.DataFrame, test: ProcessedSplit, size: int, resize: str) -> dict:
    """Known lesion boxes (demo data), mapped into the square image; row -> box."""
    lesions = lesions.set_index("path")
    boxes = {}
    for row in test.index.itertuples():
        if row.path in lesions.index:
            lesion = lesions.loc[row.path]
            geometry = square_geometry(row.width, row.height, size, resize)
            boxes[row.row] = geometry.map_box(lesion.x0, lesion.y0, lesion.x1, lesion.y1)
    return boxes


def localization_scores(cams: np.ndarray, boxes: list[tuple], size: int) -> dict[str, float]:
    """Each score next to what a random heatmap would get, the bar it has to clear."""
    tolerance = round(15 * size / 224)  # Zhang et al.'s 15 px at 224 px, scaled
    hits = [pointing_game_hit(cam, box, tolerance) for cam, box in zip(cams, boxes, strict=True)]
    energy = [energy_in_box(cam, box) for cam, box in zip(cams, boxes, strict=True)]
    return {
        "pointing_game": round(float(np.mean(hits)), 4),
        "pointing_game_random": round(random_pointing_rate(boxes, size, tolerance), 4),
        "energy_in_box": round(float(np.mean(energy)), 4),
        "energy_in_box_random": round(random_pointing_rate(boxes, size), 4),
        "lesions_scored": len(boxes),
    }


def main(argv: list[str] | None = None) -> None:
    args = paths(
        __doc__, "model", "threshold", "predictions", "processed", "lesions", "metrics", "plots",
        argv=argv,
    )  # fmt: skip
    params = load_params(Params)
    use_cpu_threads(params.runtime.threads)
    settings = params.gradcam
    require(args.model, args.threshold, args.predictions, args.processed, args.lesions)
    device = str(pick_device(params.runtime.device))
    classifier = Classifier.load(
        args.model,
        device=device,
        threshold_file=args.threshold,
        with_guard=False,
        channels_last=params.runtime.channels_last,
    )
    model, size = classifier.model, classifier.card.image_size
    try:
        layer = resolve_target_layer(model, settings.target_layer)
    except ValueError as err:
        raise ParamsError(f"gradcam.target_layer: {err}") from None
    layer_name = next(name for name, module in model.named_modules() if module is layer)
    test = load_split("test", args.processed)
    predictions = pd.read_csv(args.predictions).query("split == 'test'").reset_index(drop=True)
    boxes = lesion_boxes(pd.read_csv(args.lesions), test, size, classifier.card.resize)

    cases = select_cases(predictions, settings.per_outcome)
    rows = cases.index.to_numpy()
    images = np.asarray(test.images[rows])
    cams = compute_cams(model, classifier.to_tensor(images), settings.method, layer)
    titles = [f"{c.outcome}  {c.label}  p={c.probability:.2f}" for c in cases.itertuples()]
    with atomic_path(args.plots) as tmp:
        tmp.mkdir()
        for i, case in enumerate(cases.itertuples()):
            name = f"{case.outcome}_{i:02d}_{Path(case.path).stem}.png"
            save_panel(tmp / name, images[i], cams[i], titles[i], boxes.get(rows[i]))
        save_montage(tmp / "montage.png", list(images), list(cams), titles)

    scored = scoring_sample(test.labels, settings.score_images, params.seed)
    inputs = classifier.to_tensor(np.asarray(test.images[scored]))
    scored_cams = compute_cams(model, inputs, settings.method, layer)
    counts = np.bincount(test.labels[scored], minlength=len(CLASSES))
    report: dict = {
        "method": settings.method,
        "target_layer": layer_name,
        "images_scored": len(scored),
        **{f"scored_{name.lower()}": int(n) for name, n in zip(CLASSES, counts, strict=True)},
    }
    lesion_rows = [r for r in scored if r in boxes]
    if lesion_rows:
        positions = [int(np.flatnonzero(scored == r)[0]) for r in lesion_rows]
        report |= localization_scores(scored_cams[positions], [boxes[r] for r in lesion_rows], size)
    report |= {k: round(v, 4) for k, v in faithfulness(model, inputs, scored_cams).items()}
    similarity = [
        randomization_check(model, inputs, settings.method, layer_name, scored_cams, seed)
        for seed in RANDOMIZATION_SEEDS
    ]
    report["randomization_rank_correlation"] = round(float(np.mean(similarity)), 4)
    write_json(args.metrics, report)

    with tracking.start_stage_run(
        params.mlflow.experiment,
        params.mlflow.tracking_uri,
        classifier.card.mlflow_run_id,
        "gradcam",
    ):
        numbers = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        mlflow.log_metrics({f"gradcam_{k}": v for k, v in numbers.items()})
        mlflow.log_artifacts(str(args.plots), artifact_path="gradcam")
    print(f"{settings.method} at {layer_name}: {report}")


if __name__ == "__main__":
    run(main)
