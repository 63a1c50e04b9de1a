"""How much the headline metrics move from seed alone, next to what one real edit moves them.

A `dvc metrics diff` is only worth reading against this spread: the same code and data, trained
with another `seed` (model init, batch order, augmentation), give other numbers. The script runs
`dvc exp run -S seed=N` for each seed and one experiment with a changed setting (default
`lr=1e-5`, the README's example), reads the metrics each leaves in the workspace, and prints a
Markdown table. It restores params.yaml and the workspace results when it is done.

Run from the repository root:  python tools/seed_spread.py --seeds 42 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

HEADLINE = {
    "test AUC": ("metrics/evaluate.json", ("test", "roc_auc")),
    "test accuracy": ("metrics/evaluate.json", ("test", "accuracy")),
    "test sensitivity": ("metrics/evaluate.json", ("test", "sensitivity")),
    "test specificity": ("metrics/evaluate.json", ("test", "specificity")),
    "best validation AUC": ("metrics/train.json", ("best_val_auc",)),
    "pointing game": ("metrics/gradcam.json", ("pointing_game",)),
}


def headline_metrics() -> dict[str, float]:
    values = {}
    for name, (file, keys) in HEADLINE.items():
        node = json.loads(Path(file).read_text())
        for key in keys:
            node = node[key]
        values[name] = float(node)
    return values


def run_experiment(setting: str) -> dict[str, float]:
    print(f"dvc exp run -S {setting}", flush=True)
    subprocess.run(["dvc", "exp", "run", "-S", setting], check=True, capture_output=True)
    return headline_metrics()


def table(by_seed: list[dict[str, float]], changed: dict[str, float], setting: str) -> str:
    lines = [
        f"| metric | mean ± sd over {len(by_seed)} seeds | range | `{setting}` | change / sd |",
        "|---|---|---|---|---|",
    ]
    for name in HEADLINE:
        values = [run[name] for run in by_seed]
        mean, sd = statistics.mean(values), statistics.stdev(values)
        ratio = f"{(changed[name] - mean) / sd:+.1f}" if sd > 0 else "n/a"
        lines.append(
            f"| {name} | {mean:.3f} ± {sd:.3f} | {min(values):.3f} to {max(values):.3f}"
            f" | {changed[name]:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    parser.add_argument("--compare", default="lr=1e-5", help="a -S setting to set beside")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("a spread needs at least two seeds")
    params = Path("params.yaml")
    original = params.read_text()
    try:
        by_seed = [run_experiment(f"seed={seed}") for seed in args.seeds]
        params.write_text(original)
        changed = run_experiment(args.compare)
    finally:
        params.write_text(original)
        # Rebuilds them: DVC's run cache holds no stage with an uncached plots folder.
        subprocess.run(["dvc", "repro", "--quiet"], check=True)
    print(table(by_seed, changed, args.compare))


if __name__ == "__main__":
    main()
