"""`cvi-agent soak`: many concurrent Tavus-like conversations against a real server, for a
bounded time, on loopback. It proves the server stays up, answers every turn without errors,
keeps its added latency, and keeps its memory flat.

Three processes: a fake OpenAI-compatible upstream, the server (`cvi-agent serve` on a fresh
SQLite database, with its in-process worker), and this load generator. Each simulated
conversation loops: progressive (speculative) requests abandoned after their first chunk, then
the final request read to `[DONE]`, a pause for the replica to speak, and every few turns the
conversation ends with Tavus's callbacks (`system.shutdown`, `application.transcription_ready`)
and a new one starts. Half the conversations use an upstream persona (answered by the fake
upstream), half the deterministic `concierge`. A few probe conversations go straight to the fake
upstream with the same pattern, so the server's added time to first token is measured side by
side, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from cvi_agent.devtools.bench.params import WEATHER_TOOL
from cvi_agent.devtools.bench.processes import Child, process_tree, rss_mb
from cvi_agent.devtools.bench.stats import percentile
from cvi_agent.devtools.fakes.server import free_port

SOAK_KEY = "soak-key-0123456789"
CALLBACK_TOKEN = "soak-callback-token"
UPSTREAM_PERSONA = "soak-upstream"
FLOW_PERSONA = "concierge"
UTTERANCES = [
    "What's the weather in Paris?",
    "Could you tell me what time it is in Asia/Tokyo?",
    "Hello there, how are you doing today?",
    "I would like to hear about the breakfast options please",
    "Thanks a lot for your help",
]


@dataclass
class SoakParams:
    conversations: int = 200
    duration: float = 600.0
    think: float = 2.0  # seconds the replica "speaks" between turns
    partials: int = 3  # requests per user turn; the last is final
    turns_per_conversation: int = 6
    upstream_ttft: float = 0.05
    probes: int = 4  # conversations straight to the fake upstream, for the added latency
    sample_every: float = 2.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Stats:
    requests: int = 0
    finals: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: dict[str, list[float]] = field(
        default_factory=lambda: {"upstream": [], "flow": [], "direct": []}
    )
    callbacks: int = 0
    callback_latency: list[float] = field(default_factory=list)  # seconds per callback POST
    conversations_ended: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)

    def error(self, what: str) -> None:
        if len(self.errors) < 200:
            self.errors.append(what)
        else:
            self.errors[-1] = f"(and more) {what}"


def _persona_yaml(upstream_url: str) -> str:
    return json.dumps(
        {
            "name": UPSTREAM_PERSONA,
            "persona_name": "Soak",
            "system_prompt": "A soak-test persona answered by the fake upstream.",
            "brain": {"kind": "upstream", "model": "fake", "base_url": upstream_url + "/v1"},
        }
    )


class Conversation:
    def __init__(
        self,
        n: int,
        http: httpx.AsyncClient,
        params: SoakParams,
        stats: Stats,
        end: float,
        direct: bool,
    ) -> None:
        self.n = n
        self.http = http
        self.params = params
        self.stats = stats
        self.end = end
        self.direct = direct
        self.kind = "direct" if direct else ("upstream" if n % 2 == 0 else "flow")
        self.persona = UPSTREAM_PERSONA if self.kind != "flow" else FLOW_PERSONA

    async def _request(
        self, cid: str, messages: list[dict[str, Any]], final: bool
    ) -> tuple[float | None, str]:
        body: dict[str, Any] = {
            "model": "fake" if self.direct else self.persona,
            "stream": True,
            "messages": messages,
        }
        if self.kind == "flow":
            body["tools"] = [WEATHER_TOOL]  # as Tavus sends the persona's client tools
        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        done = False
        self.stats.requests += 1
        try:
            async with self.http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"x-conversation-id": cid}
            ) as resp:
                if resp.status_code != 200:
                    self.stats.error(f"{self.kind}: HTTP {resp.status_code}")
                    return None, ""
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    if first is None:
                        first = time.perf_counter()
                        if not final:
                            return first - started, ""  # speculative: abandoned after one chunk
                    chunk = json.loads(data)
                    for choice in chunk.get("choices") or ():
                        text.append((choice.get("delta") or {}).get("content") or "")
        except (httpx.HTTPError, ValueError) as exc:
            self.stats.error(f"{self.kind}: {type(exc).__name__}: {exc}")
            return None, ""
        if final and not done:
            self.stats.error(f"{self.kind}: stream ended without [DONE]")
        return (first - started) if first is not None else None, "".join(text)

    async def _callback(self, cid: str, event_type: str, properties: dict[str, Any]) -> None:
        if self.direct:
            return
        payload = {
            "properties": properties,
            "conversation_id": cid,
            "event_type": event_type,
            "message_type": "application" if event_type.startswith("application.") else "system",
            "timestamp": datetime.now(UTC).isoformat(),
        }
        started = time.perf_counter()
        try:
            resp = await self.http.post(
                "/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=payload
            )
            self.stats.callback_latency.append(time.perf_counter() - started)
            self.stats.callbacks += 1
            if resp.status_code != 200:
                self.stats.error(f"callback {event_type}: HTTP {resp.status_code}")
        except httpx.HTTPError as exc:
            self.stats.error(f"callback {event_type}: {type(exc).__name__}")

    async def run(self) -> None:
        p = self.params
        await asyncio.sleep((self.n % 50) * p.think / 50)  # stagger the start
        while time.monotonic() < self.end:
            cid = f"soak-{self.n}-{secrets.token_hex(4)}"
            history: list[dict[str, Any]] = [{"role": "system", "content": "You are a concierge."}]
            transcript: list[dict[str, Any]] = []
            await self._callback(cid, "system.replica_joined", {"replica_id": "r-soak"})
            for turn in range(p.turns_per_conversation):
                if time.monotonic() >= self.end:
                    break
                utterance = UTTERANCES[(self.n + turn) % len(UTTERANCES)]
                words = utterance.split()
                for k in range(1, p.partials):
                    prefix = " ".join(words[: max(1, len(words) * k // p.partials)])
                    await self._request(
                        cid, [*history, {"role": "user", "content": prefix}], final=False
                    )
                history.append({"role": "user", "content": utterance})
                ttft, reply = await self._request(cid, history, final=True)
                self.stats.finals += 1
                if ttft is not None:
                    self.stats.ttft[self.kind].append(ttft)
                history.append({"role": "assistant", "content": reply or "…"})
                transcript += history[-2:]
                await asyncio.sleep(p.think)
            await self._callback(
                cid,
                "system.shutdown",
                {"replica_id": "r-soak", "shutdown_reason": "participant_left_timeout"},
            )
            await self._callback(
                cid,
                "application.transcription_ready",
                {"replica_id": "r-soak", "transcript": transcript},
            )
            self.stats.conversations_ended += 1


async def _load(
    server_url: str,
    upstream_url: str,
    params: SoakParams,
    stats: Stats,
    server: Child,
    progress: bool,
) -> None:
    limits = httpx.Limits(
        max_connections=params.conversations * 2 + 50,
        max_keepalive_connections=params.conversations * 2,
    )
    timeout = httpx.Timeout(30.0)
    started = time.monotonic()
    end = started + params.duration
    async with (
        httpx.AsyncClient(
            base_url=server_url,
            headers={"Authorization": f"Bearer {SOAK_KEY}"},
            limits=limits,
            timeout=timeout,
        ) as through,
        httpx.AsyncClient(base_url=upstream_url, limits=limits, timeout=timeout) as direct,
    ):
        conversations = [
            Conversation(n, through, params, stats, end, False) for n in range(params.conversations)
        ]
        conversations += [
            Conversation(n, direct, params, stats, end, True) for n in range(params.probes)
        ]
        tasks = [asyncio.create_task(c.run()) for c in conversations]

        async def sample() -> None:
            while time.monotonic() < end:
                stats.rss.append(
                    (
                        round(time.monotonic() - started, 1),
                        rss_mb(process_tree(server.proc.pid) if server.proc else []),
                    )
                )
                if progress:
                    elapsed = time.monotonic() - started
                    print(
                        f"\rsoak {elapsed:5.0f}/{params.duration:.0f}s  requests {stats.requests}  "
                        f"finals {stats.finals}  errors {len(stats.errors)}  server RSS {stats.rss[-1][1]:.0f} MB",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                await asyncio.sleep(params.sample_every)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*tasks)
        sampler.cancel()
        if progress:
            print(file=sys.stderr)


def _ms(value: float | None) -> float | None:
    return round(value * 1000, 2) if value is not None else None


def summarize(params: SoakParams, stats: Stats, wall: float) -> dict[str, Any]:
    def dist(values: list[float]) -> dict[str, Any]:
        return {
            "n": len(values),
            "p50_ms": _ms(percentile(values, 50)),
            "p99_ms": _ms(percentile(values, 99)),
        }

    added: dict[str, float | None] = {}
    for q in (50, 99):
        through = percentile(stats.ttft["upstream"], q)
        direct = percentile(stats.ttft["direct"], q)
        added[f"p{q}_ms"] = (
            _ms(through - direct) if through is not None and direct is not None else None
        )
    return {
        "params": params.as_dict(),
        "wall_s": round(wall, 1),
        "requests": stats.requests,
        "final_requests": stats.finals,
        "requests_per_s": round(stats.requests / wall, 1) if wall else None,
        "conversations_ended": stats.conversations_ended,
        "callbacks": stats.callbacks,
        "callback_latency": {
            **dist(stats.callback_latency),
            "max_ms": _ms(max(stats.callback_latency, default=None)),
        },
        "errors": len(stats.errors),
        "error_samples": stats.errors[:10],
        "ttft": {k: dist(v) for k, v in stats.ttft.items()},
        "added_ttft": added,
        "server_rss_mb": memory_verdict(stats.rss),
    }


# A leak grows memory at a steady rate for the whole run; warm-up (allocator arenas, caches with
# a cap, connection pools, pymalloc) grows it early and then flattens. So the first quarter is
# ignored, and the verdict looks at the second half: its slope, and the growth from the mean of
# the second quarter to the mean of the last one.
LEAK_SLOPE_MB_PER_MIN = 6.0


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_mb = sum(mb for _, mb in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (mb - mean_mb) for t, mb in points)
    return cov / var * 60


def memory_verdict(
    rss: list[tuple[float, float]], max_slope: float = LEAK_SLOPE_MB_PER_MIN
) -> dict[str, Any]:
    """The server's RSS over the run ((seconds, MB) samples) and whether it looks like a leak:
    `leak` when the second half still grows faster than `max_slope` MB per minute."""
    samples = [mb for _, mb in rss]
    n = len(samples)
    second_quarter = samples[n // 4 : n // 2] or samples[:1]
    last_quarter = samples[n - max(1, n // 4) :] if samples else []
    early = sum(second_quarter) / len(second_quarter) if second_quarter else 0.0
    late = sum(last_quarter) / len(last_quarter) if last_quarter else 0.0
    slope = _slope_per_min(rss[n // 2 :])
    middle = samples[n // 2] if samples else 0.0
    return {
        "first": samples[0] if samples else None,
        "early_mean": round(early, 1),
        "late_mean": round(late, 1),
        "growth": round(late - early, 1),
        # From the start to the middle sample (warm-up and any leak), and from the middle sample
        # to the highest one after it (a leak only, once warm-up is over).
        "first_half_growth": round(middle - samples[0], 1) if samples else 0.0,
        "second_half_growth": round(max(samples[n // 2 :]) - middle, 1) if samples else 0.0,
        "second_half_slope_mb_per_min": round(slope, 2),
        "leak": n >= 8 and slope > max_slope,
        "peak": max(samples) if samples else None,
        "samples": n,
        "series": [mb for _, mb in rss],
    }


def render(summary: dict[str, Any]) -> str:
    t, rss, added = summary["ttft"], summary["server_rss_mb"], summary["added_ttft"]
    cb = summary["callback_latency"]
    p = summary["params"]
    rows = [
        ("conversations at once", f"{p['conversations']} (+{p['probes']} direct probes)"),
        ("duration", f"{summary['wall_s']} s"),
        (
            "requests (speculative + final)",
            f"{summary['requests']} ({summary['requests_per_s']}/s)",
        ),
        ("final requests", str(summary["final_requests"])),
        (
            "conversations ended (with callbacks)",
            f"{summary['conversations_ended']} ({summary['callbacks']} callbacks)",
        ),
        ("errors", str(summary["errors"])),
        (
            "callback latency p50 / p99 (max)",
            f"{cb['p50_ms']} / {cb['p99_ms']} ms ({cb['max_ms']} ms)",
        ),
        (
            "final TTFT, upstream persona p50 / p99",
            f"{t['upstream']['p50_ms']} / {t['upstream']['p99_ms']} ms",
        ),
        (
            "final TTFT, direct to the upstream p50 / p99",
            f"{t['direct']['p50_ms']} / {t['direct']['p99_ms']} ms",
        ),
        ("added TTFT p50 / p99", f"{added['p50_ms']} / {added['p99_ms']} ms"),
        ("final TTFT, flow persona p50 / p99", f"{t['flow']['p50_ms']} / {t['flow']['p99_ms']} ms"),
        (
            "server RSS early → late (growth)",
            f"{rss['early_mean']} → {rss['late_mean']} MB ({rss['growth']:+} MB), peak {rss['peak']} MB",
        ),
        (
            "server RSS growth, first half / second half",
            f"{rss['first_half_growth']:+} / {rss['second_half_growth']:+} MB",
        ),
        (
            "server RSS slope over the second half",
            f"{rss['second_half_slope_mb_per_min']:+} MB/min"
            + (" (LEAK?)" if rss["leak"] else " (flat)"),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for sample in summary["error_samples"]:
        lines.append(f"error: {sample}")
    return "\n".join(lines)


def run_soak(params: SoakParams, progress: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cvi-soak-") as tmp:
        work = Path(tmp)
        upstream_port, server_port = free_port(), free_port()
        upstream = Child(
            "fake upstream",
            [
                sys.executable,
                "-m",
                "cvi_agent.devtools.fakes.upstream",
                "--port",
                str(upstream_port),
                "--ttft",
                str(params.upstream_ttft),
                "--words",
                "12",
            ],
            upstream_port,
            dict(os.environ),
            work / "upstream.log",
        )
        personas = work / "personas"
        personas.mkdir()
        shipped = Path(__file__).resolve().parents[2] / "personas" / "concierge.yaml"
        (personas / "concierge.yaml").write_text(shipped.read_text() if shipped.exists() else "")
        (personas / "soak.yaml").write_text(_persona_yaml(f"http://127.0.0.1:{upstream_port}"))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CVI_", "TAVUS_")) or k.startswith("CVI_TRACEMALLOC")
        }
        env.update(
            CVI_API_KEYS=SOAK_KEY,
            CVI_CALLBACK_TOKEN=CALLBACK_TOKEN,
            CVI_PERSONAS_DIR=str(personas),
            CVI_DATABASE_URL=f"sqlite+aiosqlite:///{work / 'soak.db'}",
            CVI_VAR_DIR=str(work / "var"),
            CVI_LOG_LEVEL="warning",
            CVI_RATE_LIMIT_RPS="0",  # one key drives the whole load: no per-key limit
            CVI_RATE_LIMIT_CONCURRENT="0",
            CVI_RATE_LIMIT_BYTES="0",
            CVI_VIDEO_POLL_INTERVAL="0",
        )
        server = Child(
            "server",
            [sys.executable, "-m", "cvi_agent", "serve", "--port", str(server_port)],
            server_port,
            env,
            work / "server.log",
        )
        upstream.start("/v1/models")
        try:
            server.start("/healthz")
            stats = Stats()
            started = time.monotonic()
            asyncio.run(_load(server.url, upstream.url, params, stats, server, progress))
            wall = time.monotonic() - started
            alive = server.proc is not None and server.proc.poll() is None
            if not alive:
                stats.error("the server exited during the soak:\n" + server.log_tail())
            return summarize(params, stats, wall)
        finally:
            server.stop()
            upstream.stop()


def add_soak_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "soak",
        help="many concurrent Tavus-like conversations for a bounded time: errors, latency, memory",
    )
    defaults = SoakParams()
    parser.add_argument(
        "-c",
        "--conversations",
        type=int,
        default=defaults.conversations,
        help="conversations at once",
    )
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds")
    parser.add_argument("--think", type=float, default=defaults.think, help="seconds between turns")
    parser.add_argument(
        "--partials", type=int, default=defaults.partials, help="speculative requests per turn"
    )
    parser.add_argument(
        "--upstream-ttft",
        type=float,
        default=defaults.upstream_ttft,
        help="the fake upstream's time to first token, seconds",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    params = SoakParams(
        conversations=args.conversations,
        duration=args.duration,
        think=args.think,
        partials=args.partials,
        upstream_ttft=args.upstream_ttft,
    )
    summary = run_soak(params, progress=sys.stderr.isatty() and not args.json)
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 1 if summary["errors"] else 0
