"""`cvi-agent bench`: what cvi-agent adds to a live call, measured on the machine it runs on.

Three processes, so the numbers stay honest on a small machine: the fake OpenAI-compatible
upstream (`python -m cvi_agent.devtools.fakes.upstream`), the server under test (`cvi-agent serve`,
optionally with `--workers N`), and this process, which generates Tavus-like load with a lean
HTTP/1.1 client (httptools) so the load generator costs little.

Scenarios:
- *overhead*: C concurrent streaming clients, alternating phases direct-to-upstream and through
  cvi-agent; added time to first token and inter-chunk latency, relayed chunks per second,
  server CPU per relayed chunk (from /proc), errors, peak RSS of every process.
- *speculative*: conversations sent as progressive partial transcripts (each superseding the
  last, the superseded stream closed like Tavus does), then the final request; half of them
  straight to the upstream, half through cvi-agent. Final time to first token, upstream tokens
  generated against tokens spoken, and client disconnect → upstream closed.

Every figure is reported beside its direct-to-upstream twin, as medians and tails, never as one
absolute number; the table ends with the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cvi_agent.devtools.fakes.server import free_port

BENCH_KEY = "bench-key-0123456789"
PERSONA = "bench"  # with a client tool: the overhead scenario relays tool calls too
SPEECH_PERSONA = "bench-speech"  # no tools: the speculative scenario compares spoken tokens
SYSTEM_PROMPT = (
    "You are in a live video conference call with a user. Reply in short sentences, talk to the "
    "user in a casual way. Respond only in english. You are a storyteller. You like telling "
    "stories to people of all ages. Reply in brief utterances, and ask prompting questions to "
    "the user as you tell your stories to keep them engaged. Here are some of your favorite "
    "stories: Little Red Riding Hood, The Ugly Duckling and The Three Little Pigs. You are "
    "talking to Maya, who is from Dallas, Texas. She likes a good mystery book, and her "
    "favorite author is Agatha Christie."
)
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
UTTERANCE = "please tell me a short story about a brave little fox who lives deep in the forest"
_TAG_RE = re.compile(r"^\[c(\d+)\]")


@dataclass
class BenchParams:
    scenarios: tuple[str, ...] = ("overhead", "speculative")
    concurrency: int = 100
    rounds: int = 2
    phase_seconds: float = 6.0
    warmup_seconds: float = 1.5
    workers: int = 1
    upstream_ttft: float = 0.3
    tokens_per_second: float = 50.0
    reply_words: int = 40
    tool_call_share: float = 0.1
    conversations: int = 40
    spec_concurrency: int = 10
    partials: int = 4
    partial_gap: float = 0.2
    end_of_turn: float = 0.45
    abandon_share: float = 0.2
    request_timeout: float = 30.0
    seed: int = 11
    server_src: str | None = None  # run the server from another source tree (before/after)


# ---------------------------------------------------------------- statistics


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


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


# ---------------------------------------------------------------- processes


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        kids.extend(int(x) for x in text.split())
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def self_peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Child:
    """A subprocess (fake upstream or server) on a loopback port."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self.port = port
        self.env = env
        self.log_path = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str, headers: dict[str, str] | None = None) -> Child:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(self.url + ready_path, headers=headers or {})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within 30 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> list[float]:
        return [r for r in (peak_rss_mb(pid) for pid in self.pids()) if r is not None]

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def get_text(self, path: str, headers: dict[str, str] | None = None) -> str | None:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return str(resp.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------- load generator


@dataclass(slots=True)
class StreamResult:
    sent: float
    status: int = 0
    events: list[float] = field(default_factory=list)  # arrival time of each `data:` event
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None
    closed: float | None = None  # when we closed it early

    @property
    def ttft(self) -> float | None:
        return self.events[0] - self.sent if self.events else None

    @property
    def chunks(self) -> int:
        """`data:` events before `[DONE]`."""
        return max(0, len(self.events) - (1 if self.done else 0))


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that times every SSE event it receives."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.result: StreamResult | None = None
        self._waiter: asyncio.Future[StreamResult] | None = None
        self._tail = b""
        self._clock = time.monotonic
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            self._finish(f"bad HTTP response: {exc}")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._finish("connection closed before the response ended")

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.result is not None:
            self.result.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        result = self.result
        if result is None:
            return
        buf = self._tail + body
        count = buf.count(b"data: ")
        if count:
            now = self._clock()
            result.events.extend([now] * count)
            if b"[DONE]" in buf:
                result.done = True
        self._tail = buf[-5:]

    def on_message_complete(self) -> None:
        self._finish(None)

    def _finish(self, error: str | None) -> None:
        waiter, self._waiter = self._waiter, None
        result = self.result
        if waiter is None or result is None or waiter.done():
            return
        if error is not None:
            result.error = error
        elif result.status != 200:
            result.error = f"HTTP {result.status}"
        elif not result.done:
            result.error = "stream ended without [DONE]"
        waiter.set_result(result)

    def send(self, request: bytes) -> asyncio.Future[StreamResult]:
        assert self.transport is not None
        self.result = StreamResult(sent=self._clock())
        self._tail = b""
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, "127.0.0.1", port)
    return protocol


def build_request(path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


@dataclass
class Target:
    """Where a load client sends its requests: the upstream directly, or cvi-agent."""

    name: str  # "direct" | "through"
    port: int
    path: str
    model: str
    headers: dict[str, str]
    tools: bool  # send the tool definition in the body (as Tavus sends a persona's client tools)

    def request(self, text: str, conversation: str | None) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text},
            ],
        }
        if self.tools:
            body["tools"] = [WEATHER_TOOL]
        headers = dict(self.headers)
        if conversation is not None and self.name == "through":
            headers["x-conversation-id"] = conversation
        return build_request(self.path, body, headers)


@dataclass
class PhaseStats:
    target: str
    seconds: float = 0.0
    streams: int = 0
    chunks: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each process

    def add(self, result: StreamResult) -> None:
        self.streams += 1
        if result.error is not None:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(result.error)
            return
        events = result.events[: result.chunks]
        self.chunks += len(events)
        ttft = result.ttft
        if ttft is not None:
            self.ttfts.append(ttft)
        self.gaps.extend(b - a for a, b in itertools.pairwise(events))


class Progress:
    """One live line on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.label = ""
        self.stats: PhaseStats | None = None
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def phase(self, label: str, stats: PhaseStats | None = None) -> None:
        self.label = label
        self.stats = stats
        if not self.enabled:
            print(f"bench: {label}", file=sys.stderr, flush=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            s = self.stats
            counts = (
                f"  streams {s.streams}  chunks {s.chunks}  errors {s.errors}"
                if s is not None
                else ""
            )
            line = f"\r\x1b[Kbench {time.monotonic() - self.started:5.1f}s  {self.label}{counts}"
            sys.stderr.write(line)
            sys.stderr.flush()

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


_PHASES = itertools.count()


async def _client_loop(
    target: Target, client_no: int, deadline: float, stats: PhaseStats, request_timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    conn: HttpConnection | None = None
    turn = 0
    phase = next(_PHASES)  # texts never repeat across phases: a repeat would be a replay
    # Spread the clients' first requests over a short ramp, like calls that started apart.
    await asyncio.sleep((client_no % 20) * 0.005)
    while loop.time() < deadline:
        turn += 1
        try:
            if conn is None or conn.lost:
                conn = await connect(target.port)
            text = f"phase {phase} client {client_no} turn {turn}: tell me about the weather"
            result = await asyncio.wait_for(
                conn.send(target.request(text, f"bench-{target.name}-{client_no}")),
                request_timeout,
            )
        except (OSError, TimeoutError) as exc:
            result = StreamResult(sent=loop.time(), error=f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None
        stats.add(result)
        if result.error is not None and conn is not None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


async def run_phase(
    target: Target,
    params: BenchParams,
    seconds: float,
    progress: Progress,
    label: str,
    children: dict[str, Child] | None,
) -> PhaseStats:
    stats = PhaseStats(target.name)
    progress.phase(label, stats)
    loop = asyncio.get_running_loop()
    cpu0 = _cpu_snapshot(children)
    started = loop.time()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _client_loop(target, i, deadline, stats, params.request_timeout)
            for i in range(params.concurrency)
        )
    )
    stats.seconds = loop.time() - started
    if children is not None:
        cpu1 = _cpu_snapshot(children)
        stats.cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
        stats.server_cpu = stats.cpu["server"]
    return stats


def _cpu_snapshot(children: dict[str, Child] | None) -> dict[str, float]:
    if children is None:
        return {}
    snapshot = {name: child.cpu() for name, child in children.items()}
    snapshot["load_generator"] = cpu_seconds(os.getpid())
    return snapshot


def idle_wakeup_cpu_us(samples: int = 200) -> float:
    """CPU a process burns per wake-up from a 1 ms sleep on this machine (virtualization tax).

    A streaming relay wakes up for every chunk when tokens come slowly, so this sets the floor
    of its CPU per chunk; on bare metal it is a few µs, on a busy VM tens.
    """
    start = time.process_time()
    for _ in range(samples):
        time.sleep(0.001)
    return round((time.process_time() - start) / samples * 1e6, 1)


def _merge(phases: list[PhaseStats]) -> PhaseStats:
    total = PhaseStats(phases[0].target if phases else "")
    for p in phases:
        for name, seconds in p.cpu.items():
            total.cpu[name] = total.cpu.get(name, 0.0) + seconds
        total.seconds += p.seconds
        total.streams += p.streams
        total.chunks += p.chunks
        total.errors += p.errors
        total.error_samples.extend(p.error_samples[: 5 - len(total.error_samples)])
        total.ttfts.extend(p.ttfts)
        total.gaps.extend(p.gaps)
        total.server_cpu += p.server_cpu
    return total


async def overhead_scenario(
    params: BenchParams,
    targets: list[Target],
    children: dict[str, Child],
    progress: Progress,
) -> dict[str, Any]:
    """Phases alternate between the targets (direct, null relay, through cvi-agent)."""
    if params.warmup_seconds > 0:
        await run_phase(targets[-1], params, params.warmup_seconds, progress, "warm-up", None)
    phases: dict[str, list[PhaseStats]] = {t.name: [] for t in targets}
    overhead0 = _server_histogram(children["server"], "cvi_added_overhead_seconds")
    for round_no in range(1, params.rounds + 1):
        for target in targets:
            label = f"overhead round {round_no}/{params.rounds}: {target.name}"
            stats = await run_phase(target, params, params.phase_seconds, progress, label, children)
            phases[target.name].append(stats)
    overhead1 = _server_histogram(children["server"], "cvi_added_overhead_seconds")
    sides = {name: _merge(stats) for name, stats in phases.items()}
    ttft = {name: summarize_ms(side.ttfts) for name, side in sides.items()}
    gaps = {name: summarize_ms(side.gaps) for name, side in sides.items()}
    t = sides["through"]
    server_cpu_per_chunk = t.server_cpu / t.chunks * 1e6 if t.chunks else None

    def added(table: dict[str, dict[str, float | None]], base: str) -> dict[str, float | None]:
        if base not in table:
            return {}
        return {q: _delta(table["through"][q], table[base][q]) for q in table["through"]}

    return {
        "concurrency": params.concurrency,
        "sides": list(sides),
        "streams": {name: side.streams for name, side in sides.items()},
        "ttft_ms": ttft,
        "added_ttft_ms": added(ttft, "direct"),
        "added_ttft_over_relay_ms": added(ttft, "relay"),
        "server_measured_overhead_ms": _histogram_quantiles(overhead0, overhead1),
        "inter_chunk_ms": gaps,
        "added_inter_chunk_ms": added(gaps, "direct"),
        "added_inter_chunk_over_relay_ms": added(gaps, "relay"),
        "chunks_per_second": {
            name: round(side.chunks / side.seconds, 1) if side.seconds else None
            for name, side in sides.items()
        },
        "chunks": {name: side.chunks for name, side in sides.items()},
        "server_cpu_us_per_chunk": round(server_cpu_per_chunk, 2)
        if server_cpu_per_chunk is not None
        else None,
        "server_cpu_share": round(t.server_cpu / t.seconds, 3) if t.seconds else None,
        "cpu_share": {
            name: {proc: round(sec / side.seconds, 3) for proc, sec in side.cpu.items()}
            for name, side in sides.items()
            if side.seconds
        },
        "errors": {name: side.errors for name, side in sides.items()},
        "error_samples": [e for side in sides.values() for e in side.error_samples][:10],
    }


# ---------------------------------------------------------------- speculative scenario


@dataclass
class ConversationPlan:
    number: int
    via: str  # direct | through
    abandon: bool  # the user's last words never become a turn: no final request
    close_first: bool  # close the previous stream before sending the next request
    partials: list[str]
    delay: float  # when the conversation starts (conversations do not speak in lockstep)


@dataclass
class ConversationResult:
    plan: ConversationPlan
    streams: list[StreamResult] = field(default_factory=list)  # partials, then the final
    final: StreamResult | None = None


def plan_conversations(params: BenchParams) -> list[ConversationPlan]:
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
            )
        )
    return plans


async def _open_stream(target: Target, text: str, conversation: str) -> HttpConnection:
    conn = await connect(target.port)
    conn.send(target.request(text, conversation))
    return conn


def _close(conn: HttpConnection) -> None:
    result = conn.result
    if result is not None and conn._waiter is not None and not conn._waiter.done():
        result.closed = time.monotonic()
    conn.close()


async def run_conversation(
    plan: ConversationPlan, target: Target, params: BenchParams, run_id: str
) -> ConversationResult:
    out = ConversationResult(plan)
    conversation = f"bench-{run_id}-{plan.number}"
    await asyncio.sleep(plan.delay)
    previous: HttpConnection | None = None
    conns: list[HttpConnection] = []
    for text in plan.partials:
        if previous is not None and plan.close_first:
            _close(previous)
        conn = await _open_stream(target, text, conversation)
        conns.append(conn)
        if previous is not None and not plan.close_first:
            _close(previous)
        previous = conn
        await asyncio.sleep(params.partial_gap)
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
        assert final._waiter is not None
        try:
            await asyncio.wait_for(asyncio.shield(final._waiter), params.request_timeout)
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
    plans = plan_conversations(params)
    mark = upstream.get_json("/_fake/records?since=0")["next"]
    replays0 = _server_counter(server, "cvi_turns_replayed_total")
    progress.phase(f"speculative: {len(plans)} conversations")
    limit = asyncio.Semaphore(params.spec_concurrency)

    async def one(plan: ConversationPlan) -> ConversationResult:
        async with limit:
            target = through if plan.via == "through" else direct
            return await run_conversation(plan, target, params, run_id)

    results = await asyncio.gather(*(one(p) for p in plans))
    await asyncio.sleep(0.3)  # let the upstream notice the last disconnects
    records = upstream.get_json(f"/_fake/records?since={mark}")["records"]
    replays = _server_counter(server, "cvi_turns_replayed_total")

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
    out["final_ttft_ratio_p50"] = _ratio(
        sides["through"]["final_ttft_ms"]["p50"], sides["direct"]["final_ttft_ms"]["p50"]
    )
    out["replay_hits"] = None if replays is None or replays0 is None else int(replays - replays0)
    out["errors"] = sides["direct"]["errors"] + sides["through"]["errors"]
    return out


def _server_histogram(server: Child, name: str) -> dict[float, float] | None:
    """Cumulative bucket counts {upper bound: count} of a server histogram (None: no metrics)."""
    text = server.get_text("/metrics", {"Authorization": f"Bearer {BENCH_KEY}"})
    if text is None:
        return None
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            series, value = line.rsplit(" ", 1)
            le = series.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def _histogram_quantiles(
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


def _server_counter(server: Child, name: str) -> float | None:
    text = server.get_text("/metrics", {"Authorization": f"Bearer {BENCH_KEY}"})
    if text is None:
        return None
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(name + "_created"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


# ---------------------------------------------------------------- orchestration


def _persona_yaml(name: str, tools: bool) -> str:
    return json.dumps(
        {
            "name": name,
            "persona_name": "Bench",
            "system_prompt": "A benchmark persona answered by the fake upstream.",
            "brain": {"kind": "upstream", "model": "fake", "max_tokens": 300},
            "tools": [{**WEATHER_TOOL, "execution": "client"}] if tools else [],
        }
    )


def machine_info() -> dict[str, Any]:
    loop_name = "asyncio"
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        loop_name = "uvloop"
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "loop": loop_name,
        "idle_wakeup_cpu_us": idle_wakeup_cpu_us(),
    }


async def _run_async(
    params: BenchParams, upstream: Child, server: Child, relay: Child, progress: Progress
) -> dict[str, Any]:
    direct = Target("direct", upstream.port, "/v1/chat/completions", "fake", {}, tools=True)
    relayed = dataclasses.replace(direct, name="relay", port=relay.port)
    through = Target(
        "through",
        server.port,
        "/v1/chat/completions",
        PERSONA,
        {"Authorization": f"Bearer {BENCH_KEY}"},
        tools=True,
    )
    progress.start()
    report: dict[str, Any] = {}
    try:
        if "overhead" in params.scenarios:
            children = {"server": server, "upstream": upstream, "relay": relay}
            report["overhead"] = await overhead_scenario(
                params, [direct, relayed, through], children, progress
            )
        if "speculative" in params.scenarios:
            run_id = f"{os.getpid()}-{int(time.time())}"
            report["speculative"] = await speculative_scenario(
                params,
                dataclasses.replace(direct, tools=False),
                dataclasses.replace(through, model=SPEECH_PERSONA),
                upstream,
                server,
                progress,
                run_id,
            )
    finally:
        await progress.stop()
    return report


@contextlib.contextmanager
def _processes(params: BenchParams) -> Iterator[tuple[Child, Child, Child]]:
    workdir = Path(tempfile.mkdtemp(prefix="cvi-bench-"))
    upstream = server = relay = None
    try:
        personas = workdir / "personas"
        personas.mkdir()
        (personas / f"{PERSONA}.yaml").write_text(_persona_yaml(PERSONA, tools=True))
        (personas / f"{SPEECH_PERSONA}.yaml").write_text(_persona_yaml(SPEECH_PERSONA, False))
        env = dict(os.environ)
        upstream_port = free_port()
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
                "--tps",
                str(params.tokens_per_second),
                "--words",
                str(params.reply_words),
                "--tool-call-share",
                str(params.tool_call_share),
                "--seed",
                str(params.seed),
            ],
            upstream_port,
            env,
            workdir / "upstream.log",
        ).start("/_fake/records?since=999999999")
        server_port = free_port()
        server_env = {
            **env,
            "CVI_API_KEYS": BENCH_KEY,
            "CVI_PERSONAS_DIR": str(personas),
            "CVI_UPSTREAM_BASE_URL": upstream.url + "/v1",
            "CVI_UPSTREAM_API_KEY": "sk-bench",
            "CVI_VAR_DIR": str(workdir / "var"),
            "CVI_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'cvi.db'}",
            "CVI_LOG_LEVEL": "warning",
            # One key drives the whole load: the per-key rate limit would measure itself.
            "CVI_RATE_LIMIT_RPS": "0",
        }
        if params.server_src:
            server_env["PYTHONPATH"] = str(Path(params.server_src).resolve())
        server = Child(
            "cvi-agent",
            [
                sys.executable,
                "-m",
                "cvi_agent",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
                "--workers",
                str(params.workers),
            ],
            server_port,
            server_env,
            workdir / "server.log",
            cwd=workdir,  # not the current directory: `-m` puts it first on sys.path
        ).start("/healthz")
        relay_port = free_port()
        relay = Child(
            "null relay",
            [
                sys.executable,
                "-m",
                "cvi_agent.devtools.fakes.relay",
                "--port",
                str(relay_port),
                "--to",
                f"127.0.0.1:{upstream.port}",
            ],
            relay_port,
            env,
            workdir / "relay.log",
        ).start("/_fake/records?since=999999999")
        yield upstream, server, relay
    finally:
        for child in (relay, server, upstream):
            if child is not None:
                child.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run_loop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_bench(params: BenchParams, progress: bool = False) -> dict[str, Any]:
    """Run the scenarios and return the report (what `--json` prints)."""
    started = time.monotonic()
    with _processes(params) as (upstream, server, relay):
        report = _run_loop(_run_async(params, upstream, server, relay, Progress(progress)))
        processes = {
            "server": {"pids": len(server.pids()), "peak_rss_mb": server.rss()},
            "upstream": {"peak_rss_mb": upstream.rss()},
            "relay": {"peak_rss_mb": relay.rss()},
            "load_generator": {"peak_rss_mb": [self_peak_rss_mb()]},
        }
        server_log = server.log_tail(10)
    errors = sum(
        int(section.get("errors", 0))
        if not isinstance(section.get("errors"), dict)
        else sum(section["errors"].values())
        for section in report.values()
    )
    return {
        "params": {**asdict(params), "scenarios": list(params.scenarios)},
        "machine": machine_info(),
        **report,
        "processes": processes,
        "errors": errors,
        "seconds": round(time.monotonic() - started, 1),
        "server_log_tail": server_log if errors else "",
    }


# ---------------------------------------------------------------- output


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        if value > 0 and unit == "+":
            return "+" + text
        return text
    return f"{value:,}" if isinstance(value, int) else str(value)


def _rss(report: dict[str, Any]) -> str:
    procs = report["processes"]

    def one(values: list[float]) -> str:
        return " + ".join(f"{v:.0f}" for v in values) or "-"

    return "peak RSS MB: " + ", ".join(
        f"{name.replace('_', ' ')} {one(procs[name]['peak_rss_mb'])}"
        for name in ("server", "relay", "upstream", "load_generator")
        if name in procs
    )


def format_table(report: dict[str, Any]) -> str:
    p = report["params"]
    m = report["machine"]
    lines = [
        f"cvi-agent bench: {m['cpus']} CPUs, Python {m['python']}, {m['loop']}, "
        f"server workers {p['workers']}"
        + (f" from {p['server_src']}" if p.get("server_src") else "")
        + f"; fake upstream: TTFT {p['upstream_ttft'] * 1000:.0f} ms, "
        f"{p['tokens_per_second']:g} tokens/s, {p['reply_words']} tokens/reply, "
        f"tool-call share {p['tool_call_share']:g}",
    ]
    rss = _rss(report)
    o = report.get("overhead")
    if o:
        sides: list[str] = o.get("sides") or ["direct", "through"]
        relay = "relay" in sides
        head = "".join(f"{side:>11}" for side in sides)
        lines += [
            "",
            f"Overhead: {o['concurrency']} concurrent streams, {p['rounds']} rounds of "
            f"{p['phase_seconds']:g} s per side, alternating"
            + (" (relay: a null TCP relay, the cost of any extra hop here)" if relay else ""),
            f"{'':28}{head}{'added':>10}{'ratio':>8}" + (f"{'over relay':>12}" if relay else ""),
        ]

        def row(label: str, values: dict[str, Any], extra: str = "") -> str:
            return f"{label:28}" + "".join(f"{_fmt(values.get(x)):>11}" for x in sides) + extra

        for label, key in (("time to first token", "ttft"), ("inter-chunk gap", "inter_chunk")):
            table = o[f"{key}_ms"]
            for q in ("p50", "p95", "p99"):
                added = _fmt(o[f"added_{key}_ms"].get(q), "+")
                ratio = _fmt(_ratio(table["through"][q], table["direct"][q]))
                over = _fmt(o.get(f"added_{key}_over_relay_ms", {}).get(q), "+")
                lines.append(
                    row(
                        f"{label} {q} (ms)",
                        {x: table[x][q] for x in sides},
                        f"{added:>10}{ratio:>8}" + (f"{over:>12}" if relay else ""),
                    )
                )
            server_view = o.get("server_measured_overhead_ms")
            if key == "ttft" and server_view:
                lines.append(
                    "  added, as the server itself measures it (bucket bounds, ms): "
                    + "  ".join(f"{q} ≤ {_fmt(server_view[q])}" for q in ("p50", "p95", "p99"))
                )
        cps = o["chunks_per_second"]
        lines += [
            row(
                "chunks per second",
                cps,
                f"{'':>10}{_fmt(_ratio(cps.get('through'), cps.get('direct'))):>8}",
            ),
            row("streams", o["streams"]),
            row("errors", o["errors"]),
            *(
                row(
                    "CPU share: " + proc.replace("_", " "),
                    {x: o["cpu_share"].get(x, {}).get(proc) for x in sides},
                )
                for proc in ("server", "relay", "upstream", "load_generator")
                if any(proc in o["cpu_share"].get(x, {}) for x in sides)
            ),
            f"{'server CPU per chunk (µs)':28}{_fmt(o['server_cpu_us_per_chunk']):>11}"
            f"   (through; one idle wake-up on this machine costs "
            f"{_fmt(m.get('idle_wakeup_cpu_us'))} µs)",
            rss,
        ]
        if o["error_samples"]:
            lines.append(f"error samples: {'; '.join(o['error_samples'])}")
    s = report.get("speculative")
    if s:
        lines += [
            "",
            f"Speculative: {s['conversations']} conversations, {p['partials']} progressive "
            f"partials {p['partial_gap'] * 1000:.0f} ms apart, final after "
            f"{p['end_of_turn'] * 1000:.0f} ms, {p['abandon_share']:.0%} abandoned",
            f"{'':36}{'direct':>12}{'through':>12}{'ratio':>9}",
        ]
        d, t = s["direct"], s["through"]
        for q in ("p50", "p99"):
            dv, tv = d["final_ttft_ms"][q], t["final_ttft_ms"][q]
            lines.append(
                f"{'final time to first token ' + q + ' (ms)':36}{_fmt(dv):>12}{_fmt(tv):>12}"
                f"{_fmt(_ratio(tv, dv)):>9}"
            )
        lines += [
            f"{'upstream tokens generated':36}{_fmt(d['upstream_tokens_generated']):>12}"
            f"{_fmt(t['upstream_tokens_generated']):>12}"
            f"{_fmt(_ratio(t['upstream_tokens_generated'], d['upstream_tokens_generated'])):>9}",
            f"{'tokens spoken (finals)':36}{_fmt(d['tokens_spoken']):>12}"
            f"{_fmt(t['tokens_spoken']):>12}",
            f"{'generated per spoken':36}{_fmt(d['generated_per_spoken']):>12}"
            f"{_fmt(t['generated_per_spoken']):>12}",
        ]
        for label, key in (
            ("disconnect→upstream closed", "cancel_delay_abandoned_ms"),
            ("superseded: close→upstream closed", "cancel_delay_superseded_ms"),
        ):
            for q in ("p50", "p99"):
                lines.append(
                    f"{label + ' ' + q:36}{_fmt(d[key][q]):>12}{_fmt(t[key][q]):>12}"
                    + ("   ms" if q == "p50" else "")
                )
        lines += [
            f"{'replay hits (server metric)':36}{'':>12}{_fmt(s['replay_hits']):>12}",
            f"{'errors':36}{_fmt(d['errors']):>12}{_fmt(t['errors']):>12}",
            rss,
            "(negative close→closed: the upstream was closed by the superseding request before "
            "the client let go)",
        ]
    lines += ["", f"errors: {report['errors']}   took {report['seconds']} s"]
    if report.get("server_log_tail"):
        lines += ["server log:", report["server_log_tail"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchParams()
    parser.add_argument(
        "--scenario",
        choices=["all", "overhead", "speculative"],
        default="all",
        help="which scenario(s) to run (default: all)",
    )
    parser.add_argument("-c", "--concurrency", type=int, default=d.concurrency)
    parser.add_argument("--rounds", type=int, default=d.rounds, help="direct/through phase pairs")
    parser.add_argument(
        "--seconds", type=float, default=d.phase_seconds, help="length of one phase"
    )
    parser.add_argument("--warmup", type=float, default=d.warmup_seconds, help="seconds")
    parser.add_argument("--workers", type=int, default=d.workers, help="server worker processes")
    parser.add_argument("--ttft", type=float, default=d.upstream_ttft, help="upstream TTFT, s")
    parser.add_argument("--tps", type=float, default=d.tokens_per_second, help="tokens/s")
    parser.add_argument("--words", type=int, default=d.reply_words, help="tokens per reply")
    parser.add_argument("--tool-call-share", type=float, default=d.tool_call_share)
    parser.add_argument("--conversations", type=int, default=d.conversations)
    parser.add_argument("--partials", type=int, default=d.partials)
    parser.add_argument(
        "--server-src",
        default=None,
        metavar="DIR",
        help="run the server from another source tree (e.g. `git archive` of an older commit)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def params_from_args(args: argparse.Namespace) -> BenchParams:
    scenarios = ("overhead", "speculative") if args.scenario == "all" else (args.scenario,)
    return BenchParams(
        scenarios=scenarios,
        concurrency=max(1, args.concurrency),
        rounds=max(1, args.rounds),
        phase_seconds=max(0.2, args.seconds),
        warmup_seconds=max(0.0, args.warmup),
        workers=max(1, args.workers),
        upstream_ttft=max(0.0, args.ttft),
        tokens_per_second=max(0.0, args.tps),
        reply_words=max(1, args.words),
        tool_call_share=min(1.0, max(0.0, args.tool_call_share)),
        conversations=max(2, args.conversations),
        partials=max(2, args.partials),
        server_src=args.server_src,
    )


def run_cli(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    try:
        report = run_bench(params, progress=sys.stderr.isatty() and not args.json)
    except RuntimeError as exc:
        print(f"cvi-agent bench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 1 if report["errors"] else 0
