"""The benchmarks in bench/ still run against today's code, on tiny settings.

Nothing here times anything (speed is the benchmarks' job, not the tests'): a benchmark that no
longer runs is found here, not when someone needs its figure (bench/cpu_training.py kept
calling `predict_logits` with a tensor after e16084b made it take a split). Each run must print
its ratio table with one row per path, the reference at ratio 1.00 and a positive rate.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "1", "--rounds", "1", "--size", "32", "--warmup", "1", "--threads", "1"]
TINY_IMAGES = ["--min-side", "64", "--max-side", "96"]

# script, its arguments, the reference path and every path its table must show
BENCHMARKS = [
    (
        "preprocess_bench.py",
        ["--images", "8", "--rounds", "1", "--size", "32", *TINY_IMAGES],
        "(c)",
        ["(a)", "(b)", "(c)"],
    ),
    ("train_data_path.py", TINY, "(a)", ["(a)", "(b)", "(c)"]),
    (
        "imagefolder_baseline.py",
        [*TINY, "--workers", "1", "--demo-patients", "8", *TINY_IMAGES],
        "(a)",
        ["(a)", "(c)", "(c0)"],
    ),
    (
        "cpu_training.py",
        ["--arch", "resnet10t", "--size", "32", "--batch", "4", "--steps", "1", "--warmup", "0"],
        "(a)",
        ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)"],
    ),
    (
        "inference.py",
        ["--arch", "resnet10t", "--size", "32", "--images", "8", "--rounds", "1", "--warmup", "0"],
        "(a)",
        ["(a)", "(b)", "(c)", "(d)"],
    ),
]


@pytest.mark.parametrize(
    ("script", "args", "reference", "paths"), BENCHMARKS, ids=[b[0] for b in BENCHMARKS]
)
def test_a_benchmark_prints_a_ratio_for_every_path(
    script: str, args: list[str], reference: str, paths: list[str], tmp_path: Path
):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=tmp_path,  # nothing may land in the repository
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # a table row: "<path> <label...> <images/s> <pooled ratio> <median ratio> <min>-<max>"
    rows = {
        path: (float(rate), float(median))
        for path, rate, median in re.findall(
            r"^(\(\w+\)) .*? (\d+\.\d) +\d+\.\d\d +(\d+\.\d\d) +[\d.]+-[\d.]+$",
            done.stdout,
            re.MULTILINE,
        )
    }
    assert sorted(rows) == sorted(paths), done.stdout
    assert rows[reference][1] == 1.0
    assert all(rate > 0 for rate, _ in rows.values()), done.stdout
