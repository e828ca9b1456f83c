"""Percentiles and summaries; NaN where there are no values (JSON null)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of `values`; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float], quantiles: Iterable[int] = (50, 95, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p95": ..., "p99": ..., "max": ...} with None for no values."""
    ordered = sorted(values)
    found: dict[str, float | None] = {f"p{q}": finite(percentile(ordered, q)) for q in quantiles}
    found["max"] = ordered[-1] if ordered else None
    return found


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None where that means nothing."""
    if value is None or reference is None or reference == 0:
        return None
    if math.isnan(value) or math.isnan(reference):
        return None
    return value / reference


def finite(x: float) -> float | None:
    return None if math.isnan(x) else x
