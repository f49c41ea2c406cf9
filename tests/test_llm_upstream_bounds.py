"""The upstream reader's bounds against upstreams that never end a reply on their own: a line
with no end, comments or data lines forever, empty events forever, silence mid-reply; and a
caller that reads slowly. Whatever the upstream does, a turn ends at the reply budget (or at
the line cap, as a failed upstream), memory stays bounded and the event loop stays free."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.upstream import MISBEHAVIOURS, FakeUpstream, Plan, ReplyStep
from cvi_agent.llm.upstream.client import ChatStreamClient
from cvi_agent.llm.upstream.decoder import MAX_EVENT_BYTES, SSEDecoder
from cvi_agent.llm.upstream.errors import UpstreamConnectionError, UpstreamDeadline
from tests.procs import ServerProcess
from tests.support import API_KEY, ServerFactory, wait_until
from tests.upstream_support import PARAMS

FALLBACK = "Sorry, give me one second."
REPLY_BUDGET = 1.5

# -- the decoder -------------------------------------------------------------------------------


def test_a_long_line_costs_time_linear_in_its_length() -> None:
    """A line that arrives in small pieces is not re-scanned nor re-copied at each piece
    (measured: 25 ms for these 64k pieces; 1.4 s when each piece re-copied the line so far)."""
    decoder = SSEDecoder()
    out: deque[Any] = deque()
    payload = b'data: "' + b"x" * (MAX_EVENT_BYTES - 64) + b'"'
    started = time.perf_counter()
    for i in range(0, len(payload), 16):
        decoder.feed(payload[i : i + 16], out)
    decoder.feed(b"\n\n", out)
    elapsed = time.perf_counter() - started
    assert len(out) == 1 and out[0] == "x" * (MAX_EVENT_BYTES - 64)
    assert elapsed < 0.3, f"{elapsed:.2f}s for 64k pieces of one line"


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([b"data: " + b"x" * 4096] * 300, id="line-without-end"),
        pytest.param([b"data: " + b"x" * 4096 + b"\n"] * 300, id="event-without-end"),
        pytest.param([b"data: " + b"x" * (MAX_EVENT_BYTES + 1) + b"\n\n"], id="one-huge-chunk"),
    ],
)
def test_a_line_or_event_past_the_cap_fails_the_stream(pieces: list[bytes]) -> None:
    decoder = SSEDecoder()
    out: deque[Any] = deque()
    decoder.feed(b'data: {"first": 1}\n\n', out)
    for piece in pieces:
        decoder.feed(piece, out)
    decoder.feed(b'data: {"after": 1}\n\n', out)
    assert out[0] == {"first": 1}
    assert len(out) == 2, "nothing is decoded after the failure"
    assert isinstance(out[1], UpstreamConnectionError) and "1 MiB" in str(out[1])


# -- the client, over every transport ----------------------------------------------------------


@pytest.fixture(params=["httptools", "aiohttp", "proxy"])
def open_client(request: pytest.FixtureRequest) -> Any:
    """A factory of clients over each transport (the proxy one is httpx, forced)."""

    def make(url: str, **kw: Any) -> ChatStreamClient:
        if request.param == "proxy":
            return ChatStreamClient(url, "k", force_proxy=True, **kw)
        return ChatStreamClient(url, "k", transport=request.param, **kw)

    return make


async def test_a_line_without_end_fails_at_the_cap(
    upstream: FakeUpstream, open_client: Any
) -> None:
    upstream.push(MISBEHAVIOURS["long-line"]())
    client: ChatStreamClient = open_client(upstream.url + "/v1")  # type: ignore[attr-defined]
    events: list[Any] = []
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamConnectionError, match="longer than 1 MiB"):
            async with asyncio.timeout(5), await client.stream(PARAMS) as stream:
                async for event in stream:
                    events.append(event)
        await wait_until(lambda: upstream.records[-1].disconnected is not None, within=2)
    finally:
        await client.aclose()
    assert events[0]["choices"][0]["delta"]["content"] == "Hello "
    assert time.monotonic() - started < 2.0


async def test_our_own_backpressure_is_not_upstream_silence(
    upstream: FakeUpstream, open_client: Any
) -> None:
    """A reader busy elsewhere for longer than the read timeout, with the socket paused
    because of it, still gets the whole reply."""
    upstream.push(upstream.reply(" ".join(f"w{i}" for i in range(400))))
    client: ChatStreamClient = open_client(upstream.url + "/v1", read_timeout=0.5)  # type: ignore[attr-defined]
    try:
        async with await client.stream(PARAMS) as stream:
            events = [await stream.__anext__()]
            await asyncio.sleep(1.5)  # the whole reply arrives (or waits) meanwhile
            events += [event async for event in stream]
    finally:
        await client.aclose()
    assert len(events) == 402  # 400 words, finish, usage


async def test_the_deadline_interrupts_a_silent_upstream(
    upstream: FakeUpstream, open_client: Any
) -> None:
    upstream.push(MISBEHAVIOURS["hang"]())
    client: ChatStreamClient = open_client(upstream.url + "/v1")  # type: ignore[attr-defined]
    try:
        async with await client.stream(PARAMS) as stream:
            stream.expire_at(asyncio.get_running_loop().time() + 0.8)
            first = await stream.__anext__()
            started = time.monotonic()
            with pytest.raises(UpstreamDeadline, match=r"silent for 0\.\ds"):
                await stream.__anext__()
            assert time.monotonic() - started < 1.1
        await wait_until(lambda: upstream.records[-1].disconnected is not None, within=2)
        upstream.push(upstream.reply("still usable"))
        async with await client.stream(PARAMS) as stream:
            assert len([e async for e in stream]) == 4
    finally:
        await client.aclose()
    assert first["choices"][0]["delta"]["content"] == "Hello "


async def test_the_deadline_cuts_queued_events(upstream: FakeUpstream, open_client: Any) -> None:
    """Past the deadline nothing more is handed over, even what has already arrived."""
    upstream.push(upstream.reply(" ".join(f"w{i}" for i in range(50))))
    client: ChatStreamClient = open_client(upstream.url + "/v1")  # type: ignore[attr-defined]
    try:
        async with await client.stream(PARAMS) as stream:
            stream.expire_at(asyncio.get_running_loop().time() + 0.2)
            await stream.__anext__()
            await asyncio.sleep(0.4)
            with pytest.raises(UpstreamDeadline, match="still being read"):
                await stream.__anext__()
    finally:
        await client.aclose()


# -- the server, in process --------------------------------------------------------------------


def bounded_personas(tmp_path: Path, upstream_url: str) -> Path:
    d = tmp_path / "personas"
    d.mkdir(exist_ok=True)
    (d / "bounded.yaml").write_text(
        f"""
name: bounded
persona_name: Bounded
brain:
  kind: upstream
  model: m
  base_url: "{upstream_url}/v1"
  first_token_timeout: 1.0
  reply_timeout: {REPLY_BUDGET}
fallback_text: "{FALLBACK}"
on_upstream_failure: speak
"""
    )
    return d


@dataclass
class Turn:
    text: str = ""
    finish: str | None = None
    seconds: float = 0.0
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


async def turn(url: str, conversation: str | None = None, stream: bool = True, n: int = 1) -> Turn:
    """One request as raw bytes: every chunk checked to be well-formed on the wire; the text
    and finish reason are the first choice's (`n` > 1: each choice must end)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if conversation:
        headers["x-conversation-id"] = conversation
    body = {
        "model": "bounded",
        "stream": stream,
        "messages": [{"role": "user", "content": f"hello {time.monotonic()}"}],
    }
    if n > 1:
        body["n"] = n
    result = Turn()
    ended: set[int] = set()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        if not stream:
            resp = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            choice = resp.json()["choices"][0]
            assert isinstance(choice["message"]["content"], str)
            result.text, result.finish = choice["message"]["content"], choice["finish_reason"]
            result.seconds = time.monotonic() - started
            return result
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.done = True
                    continue
                chunk = json.loads(line[6:])
                result.chunks.append(chunk)
                for choice in chunk["choices"]:
                    assert type(choice["index"]) is int, line
                    content = choice["delta"].get("content")
                    assert content is None or isinstance(content, str), line
                    reason = choice.get("finish_reason")
                    assert reason is None or isinstance(reason, str), line
                    if reason:
                        ended.add(choice["index"])
                    if choice["index"] == 0:
                        result.text += content or ""
                        result.finish = reason or result.finish
    result.seconds = time.monotonic() - started
    assert ended == set(range(n)), ended
    return result


@pytest.fixture
def bounded(serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path) -> LoopbackServer:
    return serve(
        upstream,
        personas_dir=bounded_personas(tmp_path, upstream.url),  # type: ignore[attr-defined]
        upstream_read_timeout=10.0,
    )


@pytest.mark.parametrize("conversation", [None, "conv-bounded"])
@pytest.mark.parametrize(
    ("behaviour", "cause"),
    [
        ("comments", "still sending"),
        ("empty-events", "still sending"),
        ("hang", "silent for"),
    ],
)
async def test_a_reply_ends_at_the_budget_whatever_the_upstream_does(
    bounded: LoopbackServer,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    behaviour: str,
    cause: str,
    conversation: str | None,
) -> None:
    caplog.set_level(logging.WARNING)
    upstream.push(MISBEHAVIOURS[behaviour]())
    result = await turn(bounded.url, conversation)
    assert result.text == "Hello " and result.finish == "length" and result.done
    assert REPLY_BUDGET - 0.1 < result.seconds < REPLY_BUDGET + 0.6
    await wait_until(lambda: upstream.records[-1].disconnected is not None, within=2)
    warnings = [r.getMessage() for r in caplog.records if "exceeded" in r.getMessage()]
    assert len(warnings) == 1 and cause in warnings[0], caplog.text


async def test_a_reply_of_several_choices_ends_at_the_budget(
    bounded: LoopbackServer, upstream: FakeUpstream
) -> None:
    """`n` > 1 takes its own path through the brain: the same budget, every choice ended."""
    upstream.push(MISBEHAVIOURS["hang"]())
    result = await turn(bounded.url, n=2)
    assert result.text == "Hello " and result.finish == "length" and result.done
    assert REPLY_BUDGET - 0.1 < result.seconds < REPLY_BUDGET + 0.6


@pytest.mark.parametrize("conversation", [None, "conv-bounded"])
@pytest.mark.parametrize("behaviour", ["long-line", "data-lines"])
async def test_a_line_or_event_past_the_cap_fails_the_upstream(
    bounded: LoopbackServer,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    behaviour: str,
    conversation: str | None,
) -> None:
    caplog.set_level(logging.WARNING)
    upstream.push(MISBEHAVIOURS[behaviour]())
    result = await turn(bounded.url, conversation)
    assert result.text == "Hello " and result.finish == "stop" and result.done
    assert result.seconds < 1.0
    await wait_until(lambda: upstream.records[-1].disconnected is not None, within=2)
    assert "longer than 1 MiB" in caplog.text


@pytest.mark.parametrize("stream", [True, False])
async def test_a_line_without_end_before_any_token_speaks_the_fallback(
    bounded: LoopbackServer, upstream: FakeUpstream, stream: bool
) -> None:
    upstream.push(Plan(steps=[ReplyStep(raw=b"x" * 65536, repeat=100_000)]))
    result = await turn(bounded.url, stream=stream)
    assert result.text == FALLBACK and result.finish == "stop"
    assert result.seconds < 1.0


async def test_a_reply_cut_while_the_caller_reads_slowly_says_so(
    bounded: LoopbackServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Not the upstream's fault: the log says the reply was still being relayed."""
    caplog.set_level(logging.WARNING)
    upstream.push(upstream.reply(" ".join("w" * 2000 for _ in range(3000))))
    body = slow_request(bounded.port, "bounded", f"slow {time.monotonic()}")
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(body)
        time.sleep(REPLY_BUDGET + 0.5)
        data = read_all(sock, 20)
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b'"finish_reason":"length"' in data
    warnings = [r.getMessage() for r in caplog.records if "exceeded" in r.getMessage()]
    assert len(warnings) == 1 and "still being read" in warnings[0], caplog.text


def slow_request(port: int, model: str, text: str) -> bytes:
    payload = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]}
    ).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


def read_all(sock: socket.socket, within: float) -> bytes:
    sock.settimeout(within)
    parts: list[bytes] = []
    while True:
        part = sock.recv(65536)
        if not part:
            return b"".join(parts)
        parts.append(part)


async def test_a_slow_caller_is_not_blamed_on_the_upstream(
    serve: ServerFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller stops reading for longer than the read timeout; the reply pauses, then
    arrives whole: our own backpressure is not upstream silence."""
    caplog.set_level(logging.WARNING)
    server = serve(upstream, upstream_read_timeout=0.5, upstream_reply_timeout=30.0)
    words = [f"w{i}-" + "x" * 4000 for i in range(3000)]
    upstream.push(upstream.reply(" ".join(words)))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(slow_request(server.port, "storyteller", f"slow {time.monotonic()}"))
        time.sleep(1.5)
        data = read_all(sock, 20)
    assert "no data from upstream" not in caplog.text
    assert data.count(b'"content":"w') == 3000, caplog.text
    assert b'"finish_reason":"stop"' in data


# -- the server as a process: memory and the event loop ----------------------------------------

PROCESS_BUDGET = 2.0
CAPPED = ("long-line", "data-lines")  # failed at the cap: ended at once, `stop`
TIMED = ("comments", "empty-events", "hang")  # ended at the reply budget: `length`


@pytest.fixture
def bad_upstream(tmp_path: Path) -> Iterator[str]:
    """The fake upstream as its own process, answering each misbehaviour by model name."""
    port = free_port()
    log = (tmp_path / "upstream.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cvi_agent.devtools.fakes.upstream",
            "--port",
            str(port),
            "--misbehave-by-model",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "fake upstream not up"
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def process_personas(tmp_path: Path, upstream_url: str) -> Path:
    d = tmp_path / "process-personas"
    d.mkdir()
    for name in ("fine", *MISBEHAVIOURS):
        (d / f"{name}.yaml").write_text(
            f"""
name: {name}
persona_name: {name}
brain:
  kind: upstream
  model: {name}
  base_url: "{upstream_url}/v1"
  first_token_timeout: 1.0
  reply_timeout: {PROCESS_BUDGET}
fallback_text: "{FALLBACK}"
on_upstream_failure: speak
"""
        )
    return d


def sync_turn(http: httpx.Client, model: str, give_up: float) -> tuple[str, str | None, float]:
    """(text, finish reason, seconds) of one streamed turn; the connection is dropped after
    `give_up` seconds (only a reader with no bound would need that)."""
    started = time.monotonic()
    text, finish = "", None
    body = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": f"hi {started}"}],
    }
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=give_up) as resp:
            for line in resp.iter_lines():
                if time.monotonic() - started > give_up:
                    break
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
                        finish = choice.get("finish_reason") or finish
    except httpx.ReadTimeout:
        pass  # nothing came for `give_up` seconds: the turn has no end
    return text, finish, time.monotonic() - started


@pytest.mark.process
@pytest.mark.slow
def test_misbehaving_upstreams_leave_memory_and_the_event_loop_alone(
    tmp_path: Path, bad_upstream: str
) -> None:
    """Every misbehaviour streams at once, turn after turn, for several seconds: the server's
    RSS grows by less than 30 MB and `/healthz` answers within 50 ms (p99 of 100)."""
    server = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        env={
            "CVI_PERSONAS_DIR": str(process_personas(tmp_path, bad_upstream)),
            "CVI_UPSTREAM_READ_TIMEOUT": "10",
        },
    ).start()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.Client(base_url=server.url, headers=auth, timeout=10) as http:
            for model in ("fine", *MISBEHAVIOURS):  # warm up: every code path imported
                sync_turn(http, model, PROCESS_BUDGET + 3)
        process = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
        baseline = process.memory_info().rss
        stop = threading.Event()
        turns: dict[str, list[tuple[str, str | None, float]]] = {m: [] for m in MISBEHAVIOURS}
        peak = [baseline]

        def caller(model: str) -> None:
            with httpx.Client(base_url=server.url, headers=auth, timeout=10) as http:
                while not stop.is_set():
                    turns[model].append(sync_turn(http, model, PROCESS_BUDGET + 3))

        def sampler() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.05)

        threads = [threading.Thread(target=caller, args=(m,)) for m in MISBEHAVIOURS]
        threads.append(threading.Thread(target=sampler))
        for thread in threads:
            thread.start()
        latencies = []
        try:
            time.sleep(0.5)
            with httpx.Client(base_url=server.url, timeout=20) as probe:
                for _ in range(100):
                    started = time.perf_counter()
                    assert probe.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.04)
        finally:
            stop.set()
            for thread in threads:
                thread.join(PROCESS_BUDGET + 5)
        peak[0] = max(peak[0], process.memory_info().rss)
    finally:
        server.stop()
    latencies.sort()
    p99 = latencies[98]
    growth = (peak[0] - baseline) / 1e6
    print(
        f"healthz p50 {latencies[49] * 1000:.1f} ms p99 {p99 * 1000:.1f} ms; RSS +{growth:.1f} MB"
    )
    for model, done in turns.items():
        assert done, model
        for text, finish, seconds in done:
            assert text == "Hello ", (model, text[:80])
            assert finish == ("stop" if model in CAPPED else "length"), (model, finish)
            assert seconds < PROCESS_BUDGET + 1.0, (model, seconds)
    assert p99 <= 0.050, f"/healthz p99 {p99 * 1000:.0f} ms while bad upstreams stream"
    assert growth < 30, f"RSS grew by {growth:.0f} MB"
