"""The speculative scenario: Tavus sends progressive partial transcripts, each superseding the
last, then the final request. Measures the final time to first token, the upstream tokens
generated against those spoken, and how soon a closed stream closes its upstream request."""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cvi_agent.devtools.bench.load import HttpConnection, Progress, StreamResult, Target, connect
from cvi_agent.devtools.bench.metrics import server_counter
from cvi_agent.devtools.bench.params import UTTERANCE, BenchParams
from cvi_agent.devtools.bench.processes import Child
from cvi_agent.devtools.bench.stats import ratio, summarize_ms

_TAG_RE = re.compile(r"^\[c(\d+)\]")


@dataclass
class ConversationPlan:
    """One conversation's script: its partials, its side, whether it is abandoned."""

    number: int
    via: str  # direct | through
    abandon: bool  # the user's last words never become a turn: no final request
    close_first: bool  # close the previous stream before sending the next request
    partials: list[str]
    delay: float  # when the conversation starts (conversations do not speak in lockstep)
    gaps: list[float] = field(default_factory=list)  # seconds after each partial (jittered)


@dataclass
class ConversationResult:
    """What one conversation's streams saw."""

    plan: ConversationPlan
    streams: list[StreamResult] = field(default_factory=list)  # partials, then the final
    final: StreamResult | None = None


def plan_conversations(params: BenchParams) -> list[ConversationPlan]:
    """The conversations, in pairs alike but for their side (seeded: the same every run)."""
    rng = random.Random(params.seed)
    words = UTTERANCE.split()
    cuts = [*sorted(rng.sample(range(2, len(words)), max(1, params.partials - 1))), len(words)]
    plans = []
    abandon = False
    for n in range(params.conversations):
        tag = f"[c{n}]"
        partials = [" ".join([tag, *words[:cut]]) for cut in cuts]
        if n % 2 == 0:  # conversations come in pairs, one per side, alike but for the side
            abandon = rng.random() < params.abandon_share
        plans.append(
            ConversationPlan(
                number=n,
                via="through" if n % 2 else "direct",
                abandon=abandon,
                close_first=(n // 2) % 2 == 1,
                partials=partials,
                delay=rng.uniform(0, params.partial_gap * 2),
                gaps=[
                    params.partial_gap * rng.uniform(1 - params.gap_jitter, 1 + params.gap_jitter)
                    for _ in partials
                ]
                if params.gap_jitter
                else [],
            )
        )
    return plans


async def _open_stream(target: Target, text: str, conversation: str) -> HttpConnection:
    """A new connection with one request sent on it (not awaited: read in the background)."""
    conn = await connect(target.port)
    conn.send(target.request(text, conversation))
    return conn


def _close(conn: HttpConnection) -> None:
    """Close a stream like Tavus does, noting when if it was still running."""
    result = conn.result
    if result is not None and conn.waiter is not None and not conn.waiter.done():
        result.closed = time.monotonic()
    conn.close()


async def run_conversation(
    plan: ConversationPlan, target: Target, params: BenchParams, run_id: str
) -> ConversationResult:
    """Play one conversation: each partial on a new stream, the previous one closed before or
    after it (both orders happen), then the final request read to its end unless abandoned."""
    out = ConversationResult(plan)
    conversation = f"bench-{run_id}-{plan.number}"
    await asyncio.sleep(plan.delay)
    previous: HttpConnection | None = None
    conns: list[HttpConnection] = []
    for number, text in enumerate(plan.partials):
        if previous is not None and plan.close_first:
            _close(previous)
        conn = await _open_stream(target, text, conversation)
        conns.append(conn)
        if previous is not None and not plan.close_first:
            _close(previous)
        previous = conn
        await asyncio.sleep(plan.gaps[number] if plan.gaps else params.partial_gap)
    assert previous is not None
    if plan.abandon:
        await asyncio.sleep(max(0.0, params.end_of_turn - params.partial_gap))
        _close(previous)
    else:
        await asyncio.sleep(max(0.0, params.end_of_turn - params.partial_gap))
        if plan.close_first:
            _close(previous)
        final = await _open_stream(target, plan.partials[-1], conversation)
        if not plan.close_first:
            _close(previous)
        conns.append(final)
        assert final.waiter is not None
        try:
            await asyncio.wait_for(asyncio.shield(final.waiter), params.request_timeout)
        except TimeoutError:
            final.result.error = "timeout"  # type: ignore[union-attr]
        out.final = final.result
        final.close()
    out.streams = [c.result for c in conns if c.result is not None]
    return out


async def speculative_scenario(
    params: BenchParams,
    direct: Target,
    through: Target,
    upstream: Child,
    server: Child,
    progress: Progress,
    run_id: str,
) -> dict[str, Any]:
    """Run the conversations (both sides at once, bounded by `spec_concurrency`) and join
    what the clients saw with the fake upstream's records of each request."""
    plans = plan_conversations(params)
    mark = upstream.get_json("/_fake/records?since=0")["next"]
    replays0 = server_counter(server, "cvi_turns_replayed_total")
    progress.phase(f"speculative: {len(plans)} conversations")
    limit = asyncio.Semaphore(params.spec_concurrency)

    async def one(plan: ConversationPlan) -> ConversationResult:
        async with limit:
            target = through if plan.via == "through" else direct
            return await run_conversation(plan, target, params, run_id)

    results = await asyncio.gather(*(one(p) for p in plans))
    await asyncio.sleep(0.3)  # let the upstream notice the last disconnects
    records = upstream.get_json(f"/_fake/records?since={mark}")["records"]
    replays = server_counter(server, "cvi_turns_replayed_total")

    by_text: dict[str, list[dict[str, Any]]] = {}
    generated = {"direct": 0, "through": 0}
    for record in records:
        match = _TAG_RE.match(record["user_text"])
        if not match:
            continue
        via = plans[int(match.group(1))].via
        generated[via] += record["chunks_sent"]
        by_text.setdefault(record["user_text"], []).append(record)
    for recs in by_text.values():
        recs.sort(key=lambda r: r["started"])

    out: dict[str, Any] = {"conversations": len(plans)}
    sides: dict[str, dict[str, Any]] = {}
    for via in ("direct", "through"):
        mine = [r for r in results if r.plan.via == via]
        finals = [r.final for r in mine if r.final is not None]
        ok_finals = [f for f in finals if f.error is None]
        spoken = sum(f.chunks - 1 for f in ok_finals)  # minus the finish chunk
        superseded_delays: list[float] = []
        abandoned_delays: list[float] = []
        errors = len(finals) - len(ok_finals)
        for conv in mine:
            seen: dict[str, int] = {}
            for stream, text in zip(
                conv.streams,
                conv.plan.partials + ([conv.plan.partials[-1]] if conv.final else []),
                strict=False,
            ):
                index = seen.get(text, 0)
                seen[text] = index + 1
                if stream.closed is None:
                    continue
                recs = by_text.get(text, [])
                rec = recs[index] if index < len(recs) else (recs[-1] if recs else None)
                if rec is None or rec["disconnected"] is None:
                    continue  # finished (or never reached the upstream): nothing to cancel
                delay = rec["disconnected"] - stream.closed
                if conv.plan.abandon and stream is conv.streams[-1]:
                    abandoned_delays.append(delay)
                else:
                    superseded_delays.append(delay)
        final_ttfts = [f.ttft for f in ok_finals if f.ttft is not None]
        sides[via] = {
            "finals": len(finals),
            "final_ttft_ms": summarize_ms(final_ttfts),
            "upstream_tokens_generated": generated[via],
            "tokens_spoken": spoken,
            "generated_per_spoken": round(generated[via] / spoken, 3) if spoken else None,
            "cancel_delay_superseded_ms": summarize_ms(superseded_delays),
            "cancel_delay_abandoned_ms": summarize_ms(abandoned_delays),
            "cancellations_measured": len(superseded_delays) + len(abandoned_delays),
            "errors": errors,
        }
    out.update(sides)
    out["final_ttft_ratio_p50"] = ratio(
        sides["through"]["final_ttft_ms"]["p50"], sides["direct"]["final_ttft_ms"]["p50"]
    )
    out["replay_hits"] = None if replays is None or replays0 is None else int(replays - replays0)
    out["errors"] = sides["direct"]["errors"] + sides["through"]["errors"]
    return out
