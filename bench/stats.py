"""Summaries of samples: median and p99 of the pooled samples, and the spread over repeats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(repeats: Sequence[Sequence[float]], scale: float = 1.0) -> dict[str, Any]:
    """``repeats``: one list of samples per repeat. Values are multiplied by ``scale``.

    ``p50``/``p99`` pool every sample; ``p50_min``/``p50_max`` are the lowest and highest
    per-repeat medians, so a reader sees how stable the median is across repeats.
    """
    pooled = [v * scale for samples in repeats for v in samples]
    medians = [percentile([v * scale for v in samples], 50) for samples in repeats if samples]
    return {
        "n": len(pooled),
        "repeats": len(repeats),
        "p50": percentile(pooled, 50),
        "p99": percentile(pooled, 99),
        "min": min(pooled) if pooled else math.nan,
        "max": max(pooled) if pooled else math.nan,
        "p50_min": min(medians) if medians else math.nan,
        "p50_max": max(medians) if medians else math.nan,
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, p99, min and max of one value per repeat (throughputs, swap times)."""
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "min": min(values) if values else math.nan,
            "max": max(values) if values else math.nan}
