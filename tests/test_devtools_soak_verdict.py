"""The soak's memory verdict on synthetic RSS series: warm-up that flattens passes, a steady
per-conversation leak fails (the one-minute soak itself is in test_devtools_soak.py)."""

from __future__ import annotations

import math
import random

from cvi_agent.devtools.soak import memory_verdict


def _series(
    seconds: float, leak_mb_per_min: float, seed: int = 1, every: float = 2.0
) -> list[tuple[float, float]]:
    """Like the soak's server: ~125 MB at start, +20 MB of warm-up flattening within a minute
    or so (allocator arenas, SQLite page caches, pools), ±1.5 MB of noise, plus a leak."""
    rng = random.Random(seed)
    points = []
    t = 0.0
    while t <= seconds:
        warm = 20 * (1 - math.exp(-t / 20))
        points.append((t, 125 + warm + leak_mb_per_min * t / 60 + rng.uniform(-1.5, 1.5)))
        t += every
    return points


def test_warm_up_that_flattens_is_not_a_leak() -> None:
    # A one-minute run is too short to tell warm-up from a leak by slope (see test_devtools_soak.py).
    for seconds in (180.0, 600.0):
        for seed in range(5):
            verdict = memory_verdict(_series(seconds, 0.0, seed))
            assert not verdict["leak"], (seconds, seed, verdict)


def test_a_steady_leak_is_caught() -> None:
    # e.g. a dict keeping every conversation: ~600 conversations a minute at ~20 KB each.
    for seconds in (60.0, 180.0, 600.0):
        for seed in range(5):
            verdict = memory_verdict(_series(seconds, 12.0, seed))
            assert verdict["leak"], (seconds, seed, verdict)
            assert verdict["second_half_slope_mb_per_min"] > 8


def test_summary_fields() -> None:
    verdict = memory_verdict(_series(60.0, 0.0))
    assert verdict["samples"] == len(verdict["series"]) == 31
    assert verdict["peak"] >= verdict["late_mean"] >= verdict["first"]
    assert memory_verdict([])["leak"] is False


def test_half_growths_tell_warm_up_from_a_leak() -> None:
    # What tests/test_devtools_soak.py asserts on its one-minute run (warm-up there is ~30 s at most).
    for seed in range(5):
        warm = memory_verdict(_series(60.0, 0.0, seed))
        leak = memory_verdict(_series(60.0, 25.0, seed))
        assert warm["second_half_growth"] < 10 < leak["second_half_growth"], (warm, leak)
        assert leak["first_half_growth"] > warm["second_half_growth"]
