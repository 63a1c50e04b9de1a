"""The method every benchmark here shares: interleaved rounds, and ratios read side by side.

The machine may be shared, so absolute images/s drift from minute to minute. The paths of one
comparison therefore run interleaved, in rotating order, over several rounds, so that load from
other work slows them alike; the headline figures are medians of per-round ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

NOISY = 1.5  # per-round ratios spanning more than this factor mark a noisy run

# A path runs once and returns (images processed, seconds they took).
TimedRun = Callable[[], tuple[int, float]]


def interleave(
    paths: dict[str, TimedRun], rounds: int, budget: float = math.inf
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run every path once per round, rotating which goes first; return images/s per path.

    Returns the pooled rate of each path and its per-round rates. No new round starts once
    the timing has taken `budget` seconds (two rounds run at least), so a busy machine cuts the
    run short instead of stretching it.
    """
    names = list(paths)
    images = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            n, s = paths[name]()
            images[name] += n
            seconds[name] += s
            per_round[name].append(n / s)
        rates = ", ".join(f"{name.split()[0]} {per_round[name][-1]:.1f}" for name in names)
        print(f"  round {r + 1}/{rounds} images/s: {rates}")
        spent = time.perf_counter() - started
        if 2 <= r + 1 < rounds and spent > budget:
            print(f"  --budget {budget:.0f} s spent ({spent:.0f} s): stopping here")
            break
    return {name: images[name] / seconds[name] for name in names}, per_round


def ratio_table(
    names: list[str], rate: dict[str, float], per_round: dict[str, list[float]], ref: str
) -> dict[str, float]:
    """Print images/s and ratios to `ref`; return each path's median per-round ratio.

    Warns when a path's per-round ratios span more than NOISY times: the load from other work
    changed within rounds, and even the median deserves a re-run.

    A round's ratio compares runs made seconds apart, so the median over rounds resists bursts
    of load from other work better than the ratio of the pooled rates (shown too).
    """
    width = max(len(name) for name in names)
    head = "÷ " + ref.split()[0]
    print(
        f"{'path':<{width}} {'images/s':>9} {head + ' pooled':>11} {head + ' median':>11}"
        f" {'rounds min-max':>15}"
    )
    medians, noisy = {}, []
    for name in names:
        ratios = [x / y for x, y in zip(per_round[name], per_round[ref], strict=True)]
        medians[name] = statistics.median(ratios)
        print(
            f"{name:<{width}} {rate[name]:>9.1f} {rate[name] / rate[ref]:>11.2f}"
            f" {medians[name]:>11.2f} {f'{min(ratios):.2f}-{max(ratios):.2f}':>15}"
        )
        if max(ratios) > NOISY * min(ratios):
            noisy.append(name.split()[0])
    if noisy:
        print(
            f"warning: per-round ratios of {', '.join(noisy)} span more than {NOISY}x:\n  the "
            "machine's load changed during rounds; re-run when it is quieter"
        )
    return medians
