"""What a simulation measured: per-turn latency and requests, callbacks, what the server recorded.

Kept apart from the engine so the same numbers serve the CLI's table, its `--json` output and
the tests, without anyone reading the engine's internals.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TurnReport:
    """One spoken reply and what it cost, the unit the latency percentiles are taken over.

    Args:
        index: position in the conversation, from 1.
        kind: `user`, `respond`, `echo` or `tool` (the follow-up after a tool result).
        text: what the user said (or the respond text, or the tool's name).
        reply: what the replica actually spoke (cut short if interrupted).
        requests: LLM requests for this turn (speculative + final).
        ttft_ms: the final request's time to first token.
        u2u_ms: user stopped speaking → replica started speaking.
        interrupted: whether the reply was cut short.
        tool: the client tool the reply called, if any.
        completion_id: the final request's `chatcmpl-…` id (its `llm.turn` record's).
        fallback: the cause, when the server answered with its fallback line instead.
    """

    index: int
    kind: str
    text: str
    reply: str = ""
    requests: int = 0
    ttft_ms: float | None = None
    u2u_ms: float | None = None
    interrupted: bool = False
    tool: str | None = None
    completion_id: str | None = None
    fallback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for `--json` and the tests."""
        return {
            "index": self.index,
            "kind": self.kind,
            "text": self.text,
            "reply": self.reply,
            "requests": self.requests,
            "ttft_ms": self.ttft_ms,
            "u2u_ms": self.u2u_ms,
            "interrupted": self.interrupted,
            "tool": self.tool,
            "completion_id": self.completion_id,
            "fallback": self.fallback,
        }


@dataclass
class InteractionReport:
    """One interaction sent through the server's API, and how long each leg took.

    Args:
        kind: the interaction's `type` (`echo`, `interrupt`, …).
        asked: the `via` the simulation asked for (`rest`, `bot`, `auto`).
        via: the path the server says delivered it (None when it failed).
        status: the API's HTTP status.
        api_ms: request sent → the API's answer.
        replica_ms: request sent → the simulated replica had it (None: it never arrived).
    """

    kind: str
    asked: str
    via: str | None
    status: int
    api_ms: float
    replica_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for `--json` and the tests."""
        return {
            "kind": self.kind,
            "asked": self.asked,
            "via": self.via,
            "status": self.status,
            "api_ms": self.api_ms,
            "replica_ms": self.replica_ms,
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


@dataclass
class SimulationReport:
    """Everything one simulation observed, filled in as it runs; errors are collected, not raised.

    A simulation reports rather than fails so a developer sees every problem of a run at once.

    Args:
        conversation_id: the conversation the simulation created on the server.
        persona: the persona it talked to.
        turns: one entry per spoken reply, in order.
        interactions: every interaction sent through the API, in order, with its path and
            latency.
        callbacks: HTTP status the server answered per Tavus callback kind.
        recorded: a summary of what the server recorded (status, events by source, counts).
        errors: every problem met, as one line each.
        duration_s: wall-clock length of the run.
    """

    conversation_id: str
    persona: str
    turns: list[TurnReport] = field(default_factory=list)
    interactions: list[InteractionReport] = field(default_factory=list)
    callbacks: dict[str, int] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The run in a few numbers (latency percentiles, counts), for the table's last line."""
        ttfts = [t.ttft_ms for t in self.turns if t.ttft_ms is not None]
        u2us = [t.u2u_ms for t in self.turns if t.u2u_ms is not None]
        pct = _pct
        return {
            "turns": len(self.turns),
            "llm_requests": sum(t.requests for t in self.turns),
            "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
            "ttft_ms_p95": pct(ttfts, 0.95),
            "u2u_ms_p50": round(statistics.median(u2us), 1) if u2us else None,
            "u2u_ms_p95": pct(u2us, 0.95),
            "interruptions": sum(t.interrupted for t in self.turns),
            "tool_calls": sum(t.tool is not None for t in self.turns),
            "fallbacks": sum(t.fallback is not None for t in self.turns),
            "interactions": self.interaction_latency(),
            "errors": len(self.errors),
        }

    def interaction_latency(self) -> dict[str, dict[str, Any]]:
        """Per delivery path: how many, and the API's answer and the replica's receipt
        latency (p50, max), so the two paths can be compared run by run."""
        paths: dict[str, dict[str, Any]] = {}
        for via in sorted({i.via for i in self.interactions if i.via}):
            mine = [i for i in self.interactions if i.via == via]
            api = [i.api_ms for i in mine]
            replica = [i.replica_ms for i in mine if i.replica_ms is not None]
            paths[via] = {
                "count": len(mine),
                "api_ms_p50": round(statistics.median(api), 1) if api else None,
                "api_ms_max": round(max(api), 1) if api else None,
                "replica_ms_p50": round(statistics.median(replica), 1) if replica else None,
                "replica_ms_max": round(max(replica), 1) if replica else None,
                "lost": len(mine) - len(replica),
            }
        return paths

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for `cvi-agent simulate --json`."""
        return {
            "conversation_id": self.conversation_id,
            "persona": self.persona,
            "duration_s": round(self.duration_s, 2),
            "summary": self.summary(),
            "turns": [t.as_dict() for t in self.turns],
            "interactions": [i.as_dict() for i in self.interactions],
            "callbacks": self.callbacks,
            "recorded": self.recorded,
            "errors": self.errors,
        }


def render_table(report: SimulationReport) -> str:
    """The report as a table and a few summary lines, for a person reading a terminal."""
    rows = [
        ("#", "kind", "requests", "ttft ms", "u2u ms", "interrupted", "tool", "fell back", "text")
    ]
    for t in report.turns:
        rows.append(
            (
                str(t.index),
                t.kind,
                str(t.requests),
                f"{t.ttft_ms:.1f}" if t.ttft_ms is not None else "-",
                f"{t.u2u_ms:.1f}" if t.u2u_ms is not None else "-",
                "yes" if t.interrupted else "",
                t.tool or "",
                "yes" if t.fallback is not None else "",
                (t.text[:40] + "…") if len(t.text) > 41 else t.text,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report.summary()
    lines.append("")
    lines.append(
        f"turns {s['turns']}, LLM requests {s['llm_requests']}, ttft p50 {s['ttft_ms_p50']} ms "
        f"(p95 {s['ttft_ms_p95']}), utterance-to-utterance p50 {s['u2u_ms_p50']} ms "
        f"(p95 {s['u2u_ms_p95']}), interruptions {s['interruptions']}, tool calls {s['tool_calls']}, "
        f"fallbacks {s['fallbacks']}, errors {s['errors']}"
    )
    for via, leg in s["interactions"].items():
        lines.append(
            f"interactions via {via}: {leg['count']}, API answer p50 {leg['api_ms_p50']} ms "
            f"(max {leg['api_ms_max']}), at the replica p50 {leg['replica_ms_p50']} ms "
            f"(max {leg['replica_ms_max']})"
            + (f", {leg['lost']} never arrived" if leg["lost"] else "")
        )
    if report.callbacks:
        lines.append("callbacks: " + ", ".join(f"{k} → {v}" for k, v in report.callbacks.items()))
    if report.recorded:
        r = report.recorded
        lines.append(
            f"recorded: status {r.get('status')}, events {r.get('events_by_source')}, "
            f"utterances {r.get('utterances')}, tool calls {r.get('tool_calls')}, "
            f"transcript lines {r.get('transcript_lines')}"
        )
    for error in report.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)
