"""Patient-grouped k-fold cross-validation of whole pipeline configurations, on validation only.

One validation split ranks configurations only as finely as its own noise: on the real images
every recipe scores 0.995-0.999 validation AUC, and neighbouring epochs' log losses differ by
more than recipes do. Here each configuration runs k times (`dvc exp run`), with fold i of the
split stage's k patient-grouped, class-stratified folds of train+val as validation
(`split.val_fraction=1/k`, `split.fold=i`), so every patient is validated once. The folds are
the same for every configuration, so the configurations are compared fold by fold: the paired
difference to the first one, with its standard error over folds. Only validation figures of
the deployed network (`metrics/evaluate.json`, calibrated as evaluate calibrates them) are
read; the test set plays no part in the choice, and this script prints none of it.

A configuration is a name and `-S` settings; the first is the reference. Within a fold, DVC
skips the stages a configuration leaves unchanged (a Grad-CAM setting does not retrain). When it
is done the script restores params.yaml and rebuilds the workspace's results with `dvc repro`:
DVC's run cache holds no stage with an uncached plots folder (members, train and the stages
after it), so those train again, as long as one fold does.

Run from the repository root:
  python -m tools.cross_validate --folds 5 --config base --config slow lr=5e-4 epochs=20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

# Validation figures that rank, and whether lower is better.
FIGURES = {
    "log_loss": True,
    "brier": True,
    "ece": True,
    "roc_auc": False,
    "specificity_at_95_sensitivity": False,
}
RANK_BY = "log_loss"
SPLIT_KEYS = ("split.val_fraction", "split.fold")


def fold_settings(folds: int, fold: int, settings: list[str]) -> list[str]:
    """The `-S` settings of one configuration's run on one fold."""
    return [f"split.val_fraction={1 / folds}", f"split.fold={fold}", *settings]


def validation_figures(metrics_file: Path) -> dict[str, float]:
    """The ranking figures of evaluate's validation split, and nothing of the test split."""
    val = json.loads(metrics_file.read_text())["val"]
    return {name: float(val[name]) for name in FIGURES}


def run_fold(folds: int, fold: int, settings: list[str]) -> dict[str, float]:
    command = ["dvc", "exp", "run"]
    for setting in fold_settings(folds, fold, settings):
        command += ["-S", setting]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return validation_figures(Path("metrics/evaluate.json"))


def summary(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: each configuration's mean ± sd over folds, then its paired difference to the
    first configuration (mean ± standard error over folds; a difference within about two
    standard errors is not one the folds can tell apart)."""
    names = list(results)
    reference = results[names[0]]
    lines = [
        "| configuration | " + " | ".join(FIGURES) + " |",
        "|---|" + "---|" * len(FIGURES),
    ]
    for name in names:
        cells = []
        for figure in FIGURES:
            values = [fold[figure] for fold in results[name]]
            cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in names[1:]:
        cells = []
        for figure in FIGURES:
            diffs = [a[figure] - b[figure] for a, b in zip(results[name], reference, strict=True)]
            error = statistics.stdev(diffs) / len(diffs) ** 0.5
            cells.append(f"{statistics.mean(diffs):+.4f} ± {error:.4f}")
        lines.append(f"| {name} minus {names[0]} (paired) | " + " | ".join(cells) + " |")
    means = {name: statistics.mean(fold[RANK_BY] for fold in results[name]) for name in names}
    best = min(means, key=means.__getitem__)
    lines.append(f"\nLowest mean validation {RANK_BY}: {best} ({means[best]:.4f}).")
    return "\n".join(lines)


def parse_configs(raw: list[list[str]], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    configs: dict[str, list[str]] = {}
    for name, *settings in raw:
        if name in configs:
            parser.error(f"--config {name}: named twice")
        for setting in settings:
            if "=" not in setting:
                parser.error(f"--config {name}: {setting!r} is not key=value")
            if setting.split("=", 1)[0] in SPLIT_KEYS:
                keys = " and ".join(SPLIT_KEYS)
                parser.error(f"--config {name}: {setting!r}: the folds set {keys}")
        configs[name] = settings
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=5, help="k, at least 2 (2 to 10 sensible)")
    parser.add_argument(
        "--config", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
        help="a configuration: its name, then dvc exp run -S settings (none: params.yaml)",
    )  # fmt: skip
    args = parser.parse_args()
    if not 2 <= args.folds <= 10:
        parser.error(f"--folds {args.folds}: between 2 and 10 (split.val_fraction 1/k ≤ 0.5)")
    configs = parse_configs(args.config, parser)
    params = Path("params.yaml")
    original = params.read_text()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    try:
        for fold in range(args.folds):  # fold-major: a stopped run still pairs its folds
            for name, settings in configs.items():
                params.write_text(original)
                figures = run_fold(args.folds, fold, settings)
                results[name].append(figures)
                print(f"{name} fold {fold + 1}/{args.folds}: " + json.dumps(figures), flush=True)
    finally:
        params.write_text(original)
        subprocess.run(["dvc", "repro", "--quiet"], check=True)
    print(summary(results))


if __name__ == "__main__":
    main()
