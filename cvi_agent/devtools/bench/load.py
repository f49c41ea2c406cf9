"""The load generator: lean keep-alive HTTP/1.1 clients (httptools) that time every SSE event,
run in phases against one target at a time while the processes' CPU is sampled around each."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httptools

from cvi_agent.devtools.bench.params import SYSTEM_PROMPT, WEATHER_TOOL, BenchParams
from cvi_agent.devtools.bench.processes import Child, cpu_seconds


@dataclass(slots=True)
class StreamResult:
    """One streamed request as the client saw it: when each event arrived, how it ended."""

    sent: float
    status: int = 0
    events: list[float] = field(default_factory=list)  # arrival time of each `data:` event
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None
    closed: float | None = None  # when we closed it early

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request to the first event."""
        return self.events[0] - self.sent if self.events else None

    @property
    def chunks(self) -> int:
        """`data:` events before `[DONE]`."""
        return max(0, len(self.events) - (1 if self.done else 0))


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that times every SSE event it receives."""

    def __init__(self) -> None:
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

    @property
    def waiter(self) -> asyncio.Future[StreamResult] | None:
        """The running request's future; None once it has finished."""
        return self._waiter

    def send(self, request: bytes) -> asyncio.Future[StreamResult]:
        """Send one request; the future resolves when its response has ended."""
        assert self.transport is not None
        self.result = StreamResult(sent=self._clock())
        self._tail = b""
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def close(self) -> None:
        """Close the connection (a running stream ends with an error)."""
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpConnection:
    """A new connection to a loopback port."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, "127.0.0.1", port)
    return protocol


def build_request(path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    """The bytes of one POST with a JSON body (built once per request, sent as they are)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


@dataclass
class Target:
    """Where a load client sends its requests: the upstream directly, or cvi-agent."""

    name: str  # "direct" | "relay" | "through"
    port: int
    path: str
    model: str
    headers: dict[str, str]
    tools: bool  # send the tool definition in the body (as Tavus sends a persona's client tools)

    def request(self, text: str, conversation: str | None) -> bytes:
        """A Tavus-like streaming chat request saying `text`."""
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
        if conversation is not None and self.name.startswith("through"):
            headers["x-conversation-id"] = conversation
        return build_request(self.path, body, headers)


@dataclass
class PhaseStats:
    """What one phase (or, merged, one side) measured."""

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
        """Count one finished stream: an error, or its events' timings."""
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
        """A new phase begins (printed on its own line when stderr is not a terminal)."""
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
        """Start refreshing the line."""
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop refreshing and clear the line."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


_PHASES = itertools.count()


async def client_loop(
    target: Target, client_no: int, deadline: float, stats: PhaseStats, request_timeout: float
) -> None:
    """One client: a request after the other on a kept-alive connection until `deadline`."""
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
    """All clients against one target for `seconds`; the processes' CPU is read around it
    (not for the warm-up, which passes no `children`)."""
    stats = PhaseStats(target.name)
    progress.phase(label, stats)
    loop = asyncio.get_running_loop()
    cpu0 = cpu_snapshot(children)
    started = loop.time()
    deadline = started + seconds
    await asyncio.gather(
        *(
            client_loop(target, i, deadline, stats, params.request_timeout)
            for i in range(params.concurrency)
        )
    )
    stats.seconds = loop.time() - started
    if children is not None:
        await settle(children)
        cpu1 = cpu_snapshot(children)
        stats.cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
        stats.server_cpu = stats.cpu["server"]
    return stats


async def settle(children: dict[str, Child], within: float = 3.0) -> None:
    """Wait (at most `within` seconds) until the processes have finished the work the phase
    left them (the server records each turn after its response ended): that CPU belongs to
    this phase's side, not to the next one's."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    before = sum(child.cpu() for child in children.values())
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        now = sum(child.cpu() for child in children.values())
        if now - before < 0.003:  # under 3 % of a core: idle (timers, the clock tick)
            return
        before = now


def cpu_snapshot(children: dict[str, Child] | None) -> dict[str, float]:
    """CPU seconds so far of each child process tree and of this process."""
    if children is None:
        return {}
    snapshot = {name: child.cpu() for name, child in children.items()}
    snapshot["load_generator"] = cpu_seconds(os.getpid())
    return snapshot


def merge_phases(phases: list[PhaseStats]) -> PhaseStats:
    """The phases of one side as one (rounds alternate sides, so each has several)."""
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
