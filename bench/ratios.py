"""Ratio tables shared by the benchmarks: images/s side by side, as ratios to a reference."""

from __future__ import annotations

import statistics

NOISY = 1.5  # per-round ratios spanning more than this factor mark a noisy run


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
