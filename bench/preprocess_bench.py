"""Preprocessing speed: the preprocess stage's decoder vs. a plain PIL loop, on the same JPEGs.

What it measures, in images per second over the same files:
  (a) our path: `cxr.preprocessing.decode_all(root, paths, size, "pad", workers)` with one worker
      process per CPU core, as the preprocess stage runs it with `runtime.workers: 0` (pool
      start-up included, as the stage pays it);
  (b) our path in one process (workers=1): JPEG draft mode without the parallelism;
  (c) the plain loop people write: `Image.open(p).convert("L").resize((size, size))`, one
      process.
(a)/(c) is the preprocess stage's speed-up over the plain loop; (b)/(c) isolates what draft
mode (decoding at a reduced DCT scale) buys; (a)/(b) is then the parallelism's share.

Why: the Kaggle originals are about 1000-2900 px, and decoding them is the preprocess stage's
whole cost. By default a Kaggle-layout demo set is generated at those sizes; `--local` runs on
an existing Kaggle-layout folder instead (kermany-224 holds 224 px files, where draft mode has
nothing to skip). The three paths run interleaved, in rotating order, over several rounds, so
a noisy shared machine slows them alike; the headline ratios are medians of per-round ratios,
and only the ratios are meant to be compared.

Run from the repository root:  .venv/bin/python bench/preprocess_bench.py --help
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ratios import ratio_table  # noqa: E402  (bench/ is the script's folder)

from cxr import preprocessing  # noqa: E402
from cxr.demo import generate_demo_dataset  # noqa: E402
from cxr.images import image_size  # noqa: E402

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default."""


def demo_patients(images: int) -> int:
    """Patients for about `images` demo images: 4 one-image val patients, others 2.5 on average.

    One patient more than that, so that the set rarely falls short; it is then capped.
    """
    return max(8, math.ceil((images - 4) / 2.5) + 5)


def list_images(root: Path, limit: int | None) -> list[str]:
    """Image paths relative to root, sorted; an evenly spread subset when over the limit."""
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if limit and len(paths) > limit:
        picks = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        paths = [paths[i] for i in picks]
    return paths


def plain_pil(root: Path, paths: list[str], size: int) -> list[np.ndarray]:
    """(c): the loop without draft mode, parallelism or aspect handling."""
    out = []
    for path in paths:
        with Image.open(root / path) as img:
            out.append(np.asarray(img.convert("L").resize((size, size))))
    return out


def ours(root: Path, paths: list[str], size: int, workers: int) -> list[np.ndarray]:
    decoded = preprocessing.decode_all(root, paths, size, "pad", workers)
    failed = [d.error for d in decoded if d.pixels is None]
    if failed:
        raise SystemExit(f"decode_all rejected {len(failed)} file(s), e.g. {failed[0]}")
    return [d.pixels for d in decoded]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        type=Path,
        help="folder for the generated demo set (default: a temp dir, deleted after); "
        "a folder that already holds images is reused as it is",
    )
    source.add_argument(
        "--local",
        type=Path,
        help="run on an existing Kaggle-layout folder instead of generating one, "
        "e.g. ../shared/data/kermany-224/chest_xray",
    )
    parser.add_argument("--images", type=int, default=60, help="about how many to generate")
    parser.add_argument("--min-side", type=int, default=1000, help="generated image sides, px")
    parser.add_argument("--max-side", type=int, default=2900, help="generated image sides, px")
    parser.add_argument("--limit", type=int, default=500, help="at most this many files")
    parser.add_argument("--size", type=int, default=224, help="side of the square output, px")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for (a), like params.yaml's runtime.workers (0 there = one per core)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    args = parser.parse_args()

    # decode_all's progress bar would interleave with the table.
    preprocessing.tqdm = partial(tqdm, disable=True)

    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        if args.local:
            root, origin = args.local, f"--local {args.local}"
        else:
            root = args.data or Path(tmp) / "chest_xray"
            origin = f"demo set in {root}"
            if root.is_dir() and list_images(root, 1):
                origin += " (reused as found)"
            else:
                patients = demo_patients(args.images)
                print(f"generating the demo set ({patients} patients) in {root} ...")
                started = time.perf_counter()
                generate_demo_dataset(
                    root,
                    patients=patients,
                    seed=0,
                    min_side=args.min_side,
                    max_side=args.max_side,
                )
                print(f"  done in {time.perf_counter() - started:.1f} s")
        paths = list_images(root, args.limit if args.local else min(args.images, args.limit))
        if not paths:
            raise SystemExit(f"no images found under {root}")
        run_bench(root, paths, origin, args)


def run_bench(root: Path, paths: list[str], origin: str, args: argparse.Namespace) -> None:
    sizes = [image_size(root / p) for p in paths]
    megabytes = sum((root / p).stat().st_size for p in paths) / 1e6
    print(
        f"{len(paths)} files from {origin}\n"
        f"  sides {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px "
        f"(median {statistics.median(w for w, _ in sizes):.0f} x "
        f"{statistics.median(h for _, h in sizes):.0f}), {megabytes:.1f} MB; "
        f"output {args.size} px; {os.cpu_count()} CPU cores"
    )

    methods: dict[str, Callable[[], list[np.ndarray]]] = {
        f"(a) decode_all, {args.workers} workers": partial(
            ours, root, paths, args.size, args.workers
        ),
        "(b) decode_all, 1 worker": partial(ours, root, paths, args.size, 1),
        "(c) plain PIL loop, 1 process": partial(plain_pil, root, paths, args.size),
    }
    names = list(methods)
    for path in paths:  # read every file once, so no path pays for a cold page cache
        (root / path).read_bytes()

    seconds = dict.fromkeys(names, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        results = {}
        for name in order:
            started = time.perf_counter()
            results[name] = methods[name]()
            elapsed = time.perf_counter() - started
            seconds[name] += elapsed
            per_round[name].append(len(paths) / elapsed)
        if r == 0 and not all(
            np.array_equal(x, y) for x, y in zip(results[names[0]], results[names[1]], strict=True)
        ):
            raise SystemExit("decode_all gave different pixels with 1 and many workers")
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{name.split()[0]} {per_round[name][-1]:.0f} img/s" for name in names)
        )

    rate = {name: args.rounds * len(paths) / seconds[name] for name in names}
    started = time.perf_counter()
    preprocessing.decode_all(root, [], args.size, "pad", args.workers)
    pool_ms = 1000 * (time.perf_counter() - started)
    print(f"\n{len(paths)} images x {args.rounds} rounds, same files, interleaved")
    ratio = ratio_table(names, rate, per_round, names[2])
    ours_vs_one = statistics.median(
        x / y for x, y in zip(per_round[names[0]], per_round[names[1]], strict=True)
    )
    print(
        f"\nmedians over rounds:"
        f"\n(a)/(c) = {ratio[names[0]]:.2f}  preprocess stage vs. plain PIL loop"
        f"\n(b)/(c) = {ratio[names[1]]:.2f}  draft mode alone (one process each)"
        f"\n(a)/(b) = {ours_vs_one:.2f}  parallelism ({args.workers} workers, pool start included)"
        f"\n(a)'s pool start and stop alone (no files): {pool_ms:.0f} ms"
    )


if __name__ == "__main__":
    main()
