"""Parallel `dvc queue` workers against serial ones: wall time of the same queued experiments.

In a throwaway copy of the project (its own git + DVC repository and MLflow store), with the
demo data prepared once (download, split, preprocess: shared, cached), it queues --experiments
demo experiments and runs them with `dvc queue start -j 1`, then again (other seeds, so DVC's
run cache cannot answer) with `-j 2` and `runtime.threads: 0` (each worker's share of the
cores, cxr/device.py), and with --before also with `-j 2` and every process taking all the
cores (what `runtime.threads: 0` did before: torch's default; slow). Each experiment is the
whole pipeline after preprocess (train, guard, evaluate, gradcam, export) at --epochs. It
prints the wall time of each queue and its ratio to `-j 1`, and the mean training images/s of
one experiment.

    .venv/bin/python bench/queue_bench.py                 # 4 experiments x 2 queues, ~15 min
    .venv/bin/python bench/queue_bench.py --experiments 2 --epochs 1 --set image_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("cxr", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore")


def sh(cwd: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return sh(cwd, env, sys.executable, "-m", "dvc", *args)


def make_project(work: Path, overrides: list[str], env: dict[str, str]) -> Path:
    project = work / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, env, "git", "init", "-q", "-b", "main")
    dvc(project, env, "init", "-q")
    dvc(project, env, "repro", "preprocess")
    sh(project, env, "git", "add", "-A")
    sh(project, env, "git", "commit", "-qm", "demo data prepared")
    return project


def run_queue(
    project: Path, env: dict[str, str], jobs: int, threads: int, seeds: range, epochs: int
) -> tuple[float, float]:
    """Wall seconds of `dvc queue start -j jobs` over one experiment per seed, and the mean
    training images/s of those experiments."""
    names = []
    for seed in seeds:
        names.append(f"bench-j{jobs}-t{threads}-s{seed}")
        dvc(
            project, env, "exp", "run", "--queue", "--name", names[-1], "-S", f"seed={seed}",
            "-S", f"epochs={epochs}", "-S", f"runtime.threads={threads}",
        )  # fmt: skip
    started = time.perf_counter()
    dvc(project, env, "queue", "start", "-j", str(jobs))
    while True:
        status = dvc(project, env, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    wall = time.perf_counter() - started
    if status.count("Success") < len(seeds) or "Failed" in status:
        raise SystemExit(f"the queue did not succeed:\n{status}")
    shown = json.loads(dvc(project, env, "exp", "show", "--json", "-A"))
    rates = [
        run["data"]["metrics"]["metrics/train.json"]["data"]["train_images_per_s"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for run in experiment["revs"]
        if run.get("name") in names
    ]
    return wall, sum(rates) / max(1, len(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a params.yaml key in the copy, e.g. image_size=32 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--before", action="store_true", help="also -j 2 with every worker taking all cores"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp copy")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="queue_bench."))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench", "GIT_COMMITTER_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_EMAIL": "bench@localhost",
    }  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    try:
        project = make_project(work, args.set, env)
        n = args.experiments
        queues = [
            ("-j 1, runtime.threads 0 (all cores)", 1, 0),
            ("-j 2, runtime.threads 0 (cores / workers)", 2, 0),
        ]
        if args.before:
            queues.append((f"-j 2, every worker {cores} threads (before)", 2, cores))
        rows = []
        for k, (label, jobs, threads) in enumerate(queues):
            seeds = range(100 * (k + 1), 100 * (k + 1) + n)
            wall, rate = run_queue(project, env, jobs, threads, seeds, args.epochs)
            rows.append((label, wall, rate))
            print(f"{label}: {wall:.0f} s, {rate:.1f} training img/s per experiment", flush=True)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{n} queued demo experiments ({args.epochs} epochs each), {cores} CPU cores")
    print("| queue | wall s | vs -j 1 | training img/s per experiment |\n|---|---|---|---|")
    for label, wall, rate in rows:
        print(f"| {label} | {wall:.0f} | {rows[0][1] / wall:.2f}x | {rate:.1f} |")


if __name__ == "__main__":
    main()
