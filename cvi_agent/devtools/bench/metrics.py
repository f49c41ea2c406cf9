"""The server's own figures, read from its Prometheus `/metrics` between two moments."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cvi_agent.devtools.bench.params import BENCH_KEY
from cvi_agent.devtools.bench.processes import Child


def _scrape(server: Child) -> list[Metric] | None:
    text = server.get_text("/metrics", {"Authorization": f"Bearer {BENCH_KEY}"})
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:  # not the Prometheus text format: no metrics to read
        return None


def server_histogram(server: Child, name: str) -> dict[float, float] | None:
    """Cumulative bucket counts {upper bound: count} of a server histogram, summed over its
    label sets (None: no metrics)."""
    families = _scrape(server)
    if families is None:
        return None
    buckets: dict[float, float] = {}
    bucket = name + "_bucket"
    for family in families:
        for sample in family.samples:
            if sample.name == bucket:
                bound = float(sample.labels["le"])  # "+Inf" parses as infinity
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantiles(
    before: dict[float, float] | None, after: dict[float, float] | None
) -> dict[str, float | None] | None:
    """p50/p95/p99 upper bounds (ms) of what a histogram recorded between two scrapes."""
    if before is None or after is None:
        return None
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        out[f"p{q}"] = None
        for bound, count in counts.items():
            if total and count >= total * q / 100:
                out[f"p{q}"] = None if bound == float("inf") else round(bound * 1000, 3)
                break
    return out


def server_counter(server: Child, name: str, **labels: str) -> float | None:
    """A server counter's value (`name` with its `_total`), summed over its label sets (those
    with `labels`); None when the server has no metrics or no such counter."""
    families = _scrape(server)
    if families is None:
        return None
    values = [
        s.value
        for family in families
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None
