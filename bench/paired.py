"""Statistics for comparisons that a noisy agent cannot flip: paths interleaved job by job
(or segment by segment) in balanced orders, and the median of the paired differences or
ratios with a bootstrap interval, rather than a difference of per-round medians.

A real ComfyUI's own time per prompt drifts by tens of ms between rounds of a few seconds;
a difference of two rounds' p50s carries that drift whole. Jobs run right beside each other
share it, so their difference cancels it, and the median of many such differences moves
little when one of them lands on a slow moment.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any


def balanced_orders(count: int) -> list[list[int]]:
    """A Williams square for ``count`` paths (``count`` even): ``count`` orders in which each
    path is at each position once and follows every other path exactly once, so neither
    a place in the cycle nor the path run just before favours any path. Repeat the orders
    cyclically for more cycles."""
    if count % 2:
        raise ValueError("a Williams square of one square needs an even number of paths")
    first = [0]
    low, high = 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    return [[(p + shift) % count for p in first] for shift in range(count)]


def median_interval(
    values: Sequence[float], digits: int = 3, *, level: float = 0.95, resamples: int = 2000
) -> dict[str, Any]:
    """The median of ``values`` with its percentile-bootstrap interval as ``min``/``max`` (the
    keys every table and the chart read as the range), the interquartile range and the
    extremes. Seeded: the same values give the same interval."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no values")
    rng = random.Random(0)
    n = len(vals)
    medians = sorted(statistics.median(rng.choices(vals, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    low = medians[int(tail * resamples)]
    high = medians[min(resamples - 1, int((1 - tail) * resamples))]
    quartiles = statistics.quantiles(vals, n=4) if n > 1 else [vals[0]] * 3
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(low, digits),
        "max": round(high, digits),
        "n": n,
        "interval": f"{level:.0%} bootstrap interval of the median (min..max)",
        "iqr": [round(quartiles[0], digits), round(quartiles[2], digits)],
        "range": [round(vals[0], digits), round(vals[-1], digits)],
        "runs": [round(float(v), digits) for v in values],
    }


def paired(a: Sequence[float], b: Sequence[float], *, ratio: bool = False) -> list[float]:
    """Per-pair ``a - b`` (or ``a / b``), pairs where ``b`` is 0 left out of a ratio."""
    if len(a) != len(b):
        raise ValueError(f"unpaired: {len(a)} against {len(b)}")
    if ratio:
        return [x / y for x, y in zip(a, b, strict=True) if y]
    return [x - y for x, y in zip(a, b, strict=True)]
