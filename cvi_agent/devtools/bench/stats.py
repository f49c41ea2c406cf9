"""Percentiles and comparisons: every figure of the report is a quantile or a difference."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 of seconds, in milliseconds."""
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v * 1000, 3)
    return out


def delta(a: float | None, b: float | None) -> float | None:
    """`a - b`, or None when either is missing."""
    return None if a is None or b is None else round(a - b, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    """`a / b`, or None when either is missing or `b` is zero."""
    return None if a is None or b is None or b == 0 else round(a / b, 4)
