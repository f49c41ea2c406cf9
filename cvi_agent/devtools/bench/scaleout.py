"""The scale-out scenario: Tavus-like speculative turns through a round-robin balancer (the null
relay, one connection per request) in front of K web processes, with their turns shared over
Redis, beside the same K processes without Redis and one process alone. Measures what
scaling out must not lose: the final request's time to first token (a replay), the upstream
generations completed per spoken turn and tokens generated per token spoken (superseded work
cancelled wherever it runs), and how soon a superseded upstream request is closed."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cvi_agent.devtools.bench.children import start_relay, start_server, start_upstream
from cvi_agent.devtools.bench.load import Progress, Target
from cvi_agent.devtools.bench.metrics import server_counter
from cvi_agent.devtools.bench.params import BENCH_KEY, SPEECH_PERSONA, BenchParams
from cvi_agent.devtools.bench.processes import Child
from cvi_agent.devtools.bench.speculative import (
    _TAG_RE,
    ConversationResult,
    plan_conversations,
    run_conversation,
)
from cvi_agent.devtools.bench.stats import summarize_ms

ROUTED = "cvi_turns_routed_total"
COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "replay_hits": ("cvi_turns_replayed_total", {}),
    "superseded": ("cvi_turns_superseded_total", {}),
    "forwarded": (ROUTED, {"outcome": "forwarded"}),
    "taken_over": (ROUTED, {"outcome": "taken_over"}),
    "local_fallback": (ROUTED, {"outcome": "local_fallback"}),
}


def _counters(servers: list[Child]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, (name, labels) in COUNTERS.items():
        out[key] = sum(server_counter(s, name, **labels) or 0.0 for s in servers)
    return out


def setups(params: BenchParams) -> list[tuple[str, int, bool]]:
    """(name, web processes, Redis) of each setup measured, side by side."""
    k = params.web_processes
    out = [("single", 1, False), (f"{k}_redis", k, True)]
    if k > 1:
        out.append((f"{k}_no_redis", k, False))
    return out


async def _start_servers(
    params: BenchParams, workdir: Path, upstream: Child, name: str, k: int, redis: bool
) -> list[Child]:
    return list(
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    start_server,
                    params,
                    workdir,
                    upstream,
                    f"{name}-{i}",
                    params.redis_url if redis else None,
                    1,
                )
                for i in range(k)
            )
        )
    )


def _analyse(results: list[ConversationResult], records: list[dict[str, Any]]) -> dict[str, Any]:
    by_text: dict[str, list[dict[str, Any]]] = {}
    generated = completed = generated_spoken = 0
    spoken_numbers = {r.plan.number for r in results if r.final is not None}
    for record in records:
        match = _TAG_RE.match(record["user_text"])
        if not match:
            continue
        generated += record["chunks_sent"]
        if int(match.group(1)) in spoken_numbers:
            generated_spoken += record["chunks_sent"]
        if record["disconnected"] is None and record["chunks_sent"]:
            completed += 1
        by_text.setdefault(record["user_text"], []).append(record)
    for recs in by_text.values():
        recs.sort(key=lambda r: r["started"])
    finals = [r.final for r in results if r.final is not None]
    ok = [f for f in finals if f.error is None]
    spoken = sum(f.chunks - 1 for f in ok)
    delays: list[float] = []
    for conv in results:
        texts = conv.plan.partials + ([conv.plan.partials[-1]] if conv.final else [])
        streams = conv.streams
        seen: dict[str, int] = {}
        indexed = []
        for stream, text in zip(streams, texts, strict=False):
            index = seen.get(text, 0)
            seen[text] = index + 1
            indexed.append((stream, text, index))
        for (old, old_text, old_index), (new, new_text, _) in itertools.pairwise(indexed):
            if new_text == old_text or not new_text.startswith(old_text):
                continue
            if old.closed is not None and old.closed < new.sent:
                continue  # closed by the client first: an abandonment, not a supersede
            recs = by_text.get(old_text, [])
            rec = recs[old_index] if old_index < len(recs) else None
            if rec is not None and rec["disconnected"] is not None:
                delays.append(rec["disconnected"] - new.sent)
    ttfts = [f.ttft for f in ok if f.ttft is not None]
    return {
        "turns": len(ok),
        "errors": len(finals) - len(ok),
        "final_ttft_ms": summarize_ms(ttfts),
        "upstream_completed": completed,
        "completions_per_turn": round(completed / len(ok), 3) if ok else None,
        "upstream_tokens_generated": generated,
        "tokens_spoken": spoken,
        "generated_per_spoken": round(generated / spoken, 3) if spoken else None,
        # the same without the abandoned conversations (their tokens are never spoken)
        "generated_per_spoken_turns_only": round(generated_spoken / spoken, 3) if spoken else None,
        "supersede_to_upstream_closed_ms": summarize_ms(delays),
        "supersedes_measured": len(delays),
    }


async def _one_setup(
    params: BenchParams,
    workdir: Path,
    upstream: Child,
    name: str,
    k: int,
    redis: bool,
    progress: Progress,
) -> dict[str, Any]:
    servers = await _start_servers(params, workdir, upstream, name, k, redis)
    relay = None
    try:
        relay = await asyncio.to_thread(start_relay, workdir, servers, "/healthz", f"relay-{name}")
        target = Target(
            "through",
            relay.port,
            "/v1/chat/completions",
            SPEECH_PERSONA,
            {"Authorization": f"Bearer {BENCH_KEY}"},
            tools=False,
        )
        plans = plan_conversations(dataclasses.replace(params, gap_jitter=0.5))
        run_id = f"{os.getpid()}-{int(time.time())}-{name}"
        mark = upstream.get_json("/_fake/records?since=0")["next"]
        before = _counters(servers)
        progress.phase(f"scaleout {name}: {len(plans)} conversations through the relay")
        limit = asyncio.Semaphore(params.spec_concurrency)

        async def one(plan: Any) -> ConversationResult:
            async with limit:
                return await run_conversation(plan, target, params, run_id)

        results = await asyncio.gather(*(one(p) for p in plans))
        await asyncio.sleep(0.3)  # let the upstream notice the last disconnects
        records = upstream.get_json(f"/_fake/records?since={mark}")["records"]
        after = _counters(servers)
        out = _analyse(list(results), records)
        out.update({key: int(after[key] - before[key]) for key in COUNTERS})
        out["web_processes"] = k
        out["redis"] = redis
        out["peak_rss_mb"] = {
            "servers": [r for s in servers for r in s.rss()],
            "relay": relay.rss(),
        }
        if out["errors"]:
            out["server_log_tail"] = [s.log_tail(10) for s in servers]
        return out
    finally:
        if relay is not None:
            relay.stop()
        for server in servers:
            server.stop()


async def scaleout_scenario(params: BenchParams, progress: Progress) -> dict[str, Any]:
    """Each setup in turn (`setups`), against one fake upstream; the report per setup."""
    workdir = Path(tempfile.mkdtemp(prefix="cvi-bench-scaleout-"))
    progress.start()
    upstream = None
    try:
        upstream = await asyncio.to_thread(start_upstream, params, workdir)
        out: dict[str, Any] = {
            "web_processes": params.web_processes,
            "conversations": params.conversations,
            "setups": {},
        }
        for name, k, redis in setups(params):
            out["setups"][name] = await _one_setup(
                params, workdir, upstream, name, k, redis, progress
            )
        out["upstream_peak_rss_mb"] = upstream.rss()
        out["errors"] = sum(s["errors"] for s in out["setups"].values())
        return out
    finally:
        await progress.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
