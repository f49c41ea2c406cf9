"""Prometheus metrics: the counters and histograms every layer records into (served by
`cvi_agent.web.metrics` at `GET /metrics`).

Recording is per request or per event, never per relayed chunk, and every labelled child is
resolved once and cached, so the hot path pays a dict lookup and an add. `cvi-agent serve
--workers N` sets `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode): each
worker writes its numbers to files there, and `render` adds up those of every worker, so
`GET /metrics` reports the whole server whichever worker answers it.
"""

from __future__ import annotations

import os
from collections.abc import Container
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import generate_latest as _generate_latest

#: Where `--workers` processes write their metrics (prometheus_client reads it at import).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

REQUESTS = Counter(
    "cvi_chat_requests",
    "Chat-completion requests by persona and HTTP status.",
    ["persona", "status"],
)
ACTIVE_STREAMS = Gauge(
    "cvi_active_streams",
    "Streaming responses being sent right now.",
    multiprocess_mode="livesum",
)
TTFT = Histogram(
    "cvi_time_to_first_token_seconds",
    "From our receiving a request to our sending its first content or tool-call chunk.",
    ["persona"],
    buckets=_LATENCY,
)
UPSTREAM_TTFT = Histogram(
    "cvi_upstream_time_to_first_token_seconds",
    "From our sending a request upstream to its first content or tool-call chunk.",
    ["persona"],
    buckets=_LATENCY,
)
OVERHEAD = Histogram(
    "cvi_added_overhead_seconds",
    "Our time to first token minus the upstream's, for turns answered by a fresh generation.",
    ["persona"],
    buckets=_OVERHEAD,
)
SUPERSEDED = Counter(
    "cvi_turns_superseded", "Generations cancelled because a longer transcript arrived."
)
REPLAYED = Counter(
    "cvi_turns_replayed", "Requests answered by attaching to an existing generation."
)
TURNS_ROUTED = Counter(
    "cvi_turns_routed",
    "Speculative turns of a conversation owned by another process (CVI_REDIS_URL): `forwarded` "
    "to the owner, `taken_over` from an owner that did not answer, `local_fallback` answered "
    "here because Redis was unreachable or slow, `refused` answered here because the owner "
    "could not.",
    ["outcome"],
)
COORDINATION_UP = Gauge(
    "cvi_turns_coordination_up",
    "1 while Redis answers turn coordination (CVI_REDIS_URL), 0 while the process answers "
    "every conversation itself.",
    multiprocess_mode="livemin",
)
CANCELLED = Counter(
    "cvi_turns_cancelled",
    "Answers cancelled because nobody listened any more: `client_disconnect` (no conversation "
    "id), `abandoned` (a conversation's generation left without listeners and no replay).",
    ["reason"],
)
TOOL_CALLS = Counter(
    "cvi_tool_calls",
    "Tool calls by name: `server` ones run here, `client` ones streamed back to Tavus. The name "
    "is one the persona or the request declares; any other name the model made up is `other`.",
    ["name", "execution", "outcome"],
)
# Tool names come from model output: only declared ones become label values, and those
# declared by requests (not by a persona) at most this many per process, so no model or client
# can grow the registry without bound. (A label child lives as long as the process.)
MAX_REQUEST_TOOL_LABELS = 100
OTHER_TOOL = "other"
_request_tool_labels: set[str] = set()

UPSTREAM_FAILURES = Counter(
    "cvi_upstream_failures",
    "Upstream attempts that failed before their first token (the next target or the fallback "
    "line answered instead), and attempts skipped because the upstream's circuit was open.",
    ["upstream", "outcome"],
)
TURN_FALLBACKS = Counter(
    "cvi_turn_fallbacks",
    "Turns whose brain failed, answered with the fallback line or an error (llm/failure.py), "
    "by persona and `reason` (`upstream_error`, `upstream_unavailable`, `upstream_timeout`, "
    "`internal_error`); the cause is in the turn's `llm.turn` record and the log.",
    ["persona", "reason"],
)

SLOW_CLIENTS = Counter(
    "cvi_slow_clients_closed",
    "Connections closed because a request's `headers` or declared `body` did not arrive within "
    "CVI_HEADER_TIMEOUT / CVI_BODY_TIMEOUT (a connection that sent nothing counts as `headers`).",
    ["phase"],
)
CONNECTIONS_REFUSED = Counter(
    "cvi_connections_refused",
    "Requests answered 503 because the process was at CVI_MAX_CONNECTIONS.",
    ["reason"],
)
THROTTLED = Counter(
    "cvi_requests_throttled",
    "Requests refused with 429 by a per-key limit: `requests` (CVI_RATE_LIMIT_RPS), `bytes` "
    "(CVI_RATE_LIMIT_BYTES) or `concurrent` (CVI_RATE_LIMIT_CONCURRENT).",
    ["limit"],
)

_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def request_done(persona: str, status: int) -> None:
    _child(REQUESTS, persona, str(status)).inc()


def first_token(persona: str, seconds: float, upstream_seconds: float | None) -> None:
    _child(TTFT, persona).observe(seconds)
    if upstream_seconds is not None:
        _child(UPSTREAM_TTFT, persona).observe(upstream_seconds)
        _child(OVERHEAD, persona).observe(max(0.0, seconds - upstream_seconds))


def tool_label(
    name: str | None, persona_tools: Container[str], request_tools: Container[str]
) -> str:
    """The `name` label for a tool call: declared names as they are, anything else `other`."""
    if not name:
        return OTHER_TOOL
    if name in persona_tools:
        return name
    if name not in request_tools:
        return OTHER_TOOL
    if name not in _request_tool_labels:
        if len(_request_tool_labels) >= MAX_REQUEST_TOOL_LABELS:
            return OTHER_TOOL
        _request_tool_labels.add(name)
    return name


def tool_call(name: str, execution: str, outcome: str) -> None:
    _child(TOOL_CALLS, name, execution, outcome).inc()


def turn_routed(outcome: str) -> None:
    _child(TURNS_ROUTED, outcome).inc()


def cancelled(reason: str) -> None:
    _child(CANCELLED, reason).inc()


def upstream_skipped(upstream: str) -> None:
    _child(UPSTREAM_FAILURES, upstream, "circuit_open").inc()


def upstream_failed(upstream: str) -> None:
    _child(UPSTREAM_FAILURES, upstream, "failed").inc()


def turn_fallback(persona: str, reason: str) -> None:
    _child(TURN_FALLBACKS, persona, reason).inc()


def slow_client(phase: str) -> None:
    _child(SLOW_CLIENTS, phase).inc()


def connection_refused(reason: str) -> None:
    _child(CONNECTIONS_REFUSED, reason).inc()


def throttled(limit: str) -> None:
    _child(THROTTLED, limit).inc()


def render() -> bytes:
    """The text exposition: this process's metrics, or every worker's added up."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return _generate_latest(registry)
    return _generate_latest(REGISTRY)


def process_exiting() -> None:
    """A worker stops: its live gauges stop counting (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
