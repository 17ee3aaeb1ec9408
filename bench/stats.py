"""Summary statistics of timing samples (median and percentiles as numpy computes them)."""
from __future__ import annotations

import math
from typing import Dict, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` in [0, 100] with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median, p20, p80, min, max and count of a list of durations (seconds)."""
    return {
        "median_s": percentile(times, 50),
        "p20_s": percentile(times, 20),
        "p80_s": percentile(times, 80),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }
