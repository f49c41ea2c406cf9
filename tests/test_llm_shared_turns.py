"""Speculative turns across processes (llm/shared_turns.py): real `cvi-agent serve` processes
sharing Redis behind a round-robin balancer (the null relay, one connection per request), the
real openai SDK as the caller, the fake upstream on loopback.

The relay starts each test at the first server, so with one connection per request the
requests of a test go to server 0, 1, 0, 1… in the order they are sent. Redis is the test
database of the shared server (CVI_TEST_REDIS_URL, db 15), except where the test stops Redis:
that one starts its own `redis-server` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from cvi_agent.devtools.fakes import relay
from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from cvi_agent.llm.shared_turns import ACCEPTED, OWNER_PREFIX, REFUSED, REQUEST, frame, link_token
from tests.procs import ServerProcess
from tests.support import API_KEY, REDIS_TEST_URL, ROOT, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.process]

BOOKINGS_ENV = "CVI_TEST_BOOKINGS"


def book_table(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A side-effecting server tool (run inside the server processes): each booking is a line
    of the file named by CVI_TEST_BOOKINGS, whichever process made it."""
    with open(os.environ[BOOKINGS_ENV], "a") as f:
        f.write(json.dumps(args) + "\n")
    return {"booked": True}


def _personas(directory: Path) -> Path:
    directory.mkdir()
    (directory / "speaker.yaml").write_text(
        json.dumps(
            {"name": "speaker", "persona_name": "S", "brain": {"kind": "upstream", "model": "f"}}
        )
    )
    (directory / "host.yaml").write_text(
        json.dumps(
            {
                "name": "host",
                "persona_name": "Host",
                "brain": {"kind": "upstream", "model": "f"},
                "tools": [
                    {
                        "execution": "server",
                        "side_effects": True,
                        "handler": "tests.test_llm_shared_turns:book_table",
                        "function": {
                            "name": "book_table",
                            "parameters": {"type": "object", "properties": {}},
                        },
                    }
                ],
            }
        )
    )
    return directory


@dataclass
class Cluster:
    """Web processes behind the round-robin relay, and what the test reads from them."""

    servers: list[ServerProcess]
    relay_url: str
    bookings: Path
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, base: str | None = None) -> openai.AsyncOpenAI:
        """The openai SDK, one connection per request (as a balancer sees Tavus)."""
        # openai's own HTTP client (httpx2), with no kept-alive connection.
        http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0))
        c = openai.AsyncOpenAI(
            base_url=(base or self.relay_url) + "/v1",
            api_key=API_KEY,
            max_retries=0,
            http_client=http,
        )
        self.clients.append(c)
        return c

    def booked(self) -> list[Any]:
        if not self.bookings.exists():
            return []
        return [json.loads(line) for line in self.bookings.read_text().splitlines()]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """A counter or gauge of one server process (summed over label sets matching `labels`)."""
    text = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    ).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def upstream_url(upstream: FakeUpstream) -> str:
    return str(upstream.url)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    upstream_url: str,
    redis_url: str,
    n: int = 2,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    """`n` servers sharing `redis_url` behind a fresh round-robin relay (`env`: more settings)."""
    personas = _personas(tmp_path / f"personas-{uuid.uuid4().hex[:6]}")
    bookings = tmp_path / "bookings.jsonl"
    servers = [
        ServerProcess(
            tmp_path,
            f"sqlite+aiosqlite:///{tmp_path / f'web{i}.db'}",
            name=f"web{i}",
            args=args,
            env={
                "CVI_REDIS_URL": redis_url,
                "CVI_PERSONAS_DIR": str(personas),
                "CVI_UPSTREAM_BASE_URL": upstream_url + "/v1",
                "CVI_UPSTREAM_API_KEY": "sk-test",
                "CVI_SIDE_EFFECT_SETTLE": "1.0",
                "CVI_VAR_DIR": str(tmp_path / f"var{i}"),
                BOOKINGS_ENV: str(bookings),
                "PYTHONPATH": str(ROOT),
                **(env or {}),
            },
        )
        for i in range(n)
    ]
    try:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(ServerProcess.start, servers))
        port = free_port()
        targets = [("127.0.0.1", s.port) for s in servers]
        balancer = asyncio.create_task(relay.serve("127.0.0.1", port, targets))
        await asyncio.sleep(0.1)
        c = Cluster(servers, f"http://127.0.0.1:{port}", bookings)
        try:
            yield c
        finally:
            for client in c.clients:
                await client.close()
            balancer.cancel()
            await asyncio.gather(balancer, return_exceptions=True)
    finally:
        for server in servers:
            server.kill()


@dataclass
class Heard:
    """One streamed answer as the caller heard it."""

    sent: float = 0.0
    first: float | None = None
    text: str = ""
    finish: str | None = None
    chunks: int = 0

    @property
    def ttft(self) -> float:
        assert self.first is not None, "no token"
        return self.first - self.sent


async def say(
    client: openai.AsyncOpenAI,
    text: str,
    conversation: str,
    heard: Heard | None = None,
    model: str = "speaker",
) -> Heard:
    heard = heard or Heard()
    heard.sent = time.monotonic()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        stream=True,
        extra_headers={"x-conversation-id": conversation},
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                if heard.first is None:
                    heard.first = time.monotonic()
                heard.text += choice.delta.content
                heard.chunks += 1
            if choice.finish_reason:
                heard.finish = choice.finish_reason
    return heard


def slow_reply(words: int = 30, gap: float = 0.05, ttft: float = 0.3) -> Plan:
    return Plan(steps=[ReplyStep(content=f"w{i} ", sleep=gap) for i in range(words)], ttft=ttft)


def booking_plan(party: int) -> Plan:
    return Plan(
        steps=[
            ReplyStep(tool_name="book_table", tool_id=f"call_{party}"),
            ReplyStep(tool_arguments=json.dumps({"party": party})),
        ],
        finish_reason="tool_calls",
    )


def conversation_id() -> str:
    return f"shared-{uuid.uuid4().hex[:10]}"


async def test_final_request_on_another_process_replays_the_generation(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    upstream.push(slow_reply())
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL) as c:
        sdk = c.client()
        speculative = Heard()
        task = asyncio.create_task(say(sdk, "Tell me a story.", cid, speculative))  # → web0
        await wait_until(lambda: speculative.first is not None, within=5)
        final = await say(sdk, "tell me a story", cid)  # → web1, forwarded to web0
        await task
        assert final.text == speculative.text and final.finish == "stop"
        assert final.ttft < 0.1, "the final request starts with the tokens already produced"
        assert len(upstream.records) == 1, "one generation for the turn"
        assert metric(c.servers[0], "cvi_turns_replayed_total") == 1
        assert metric(c.servers[1], "cvi_turns_routed_total", outcome="forwarded") == 1


async def test_longer_partial_on_another_process_closes_the_older_upstream_request(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    upstream.push(slow_reply(words=200), slow_reply(words=5))
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL) as c:
        sdk = c.client()
        older = Heard()
        task = asyncio.create_task(say(sdk, "tell me", cid, older))  # → web0, the owner
        await wait_until(lambda: older.first is not None, within=5)
        newer = await say(sdk, "tell me a story", cid)  # → web1: supersedes across processes
        superseded_at = newer.sent
        await asyncio.wait_for(task, 5)
        disconnected = upstream.records[0].disconnected
        assert disconnected is not None, "the older upstream request was closed"
        assert disconnected - superseded_at < 0.5
        assert upstream.records[0].chunks_sent < 50
        assert older.finish == "stop", "the superseded answer ended cleanly"
        assert newer.text.startswith("w0 ") and len(upstream.records) == 2
        assert metric(c.servers[0], "cvi_turns_superseded_total") == 1


async def test_side_effecting_tool_never_runs_for_a_turn_superseded_on_another_process(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    upstream.push(booking_plan(2), booking_plan(4))
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL) as c:
        sdk = c.client()
        speculative = asyncio.create_task(say(sdk, "book a table", cid, model="host"))  # web0
        await wait_until(lambda: len(upstream.records) == 1, within=5)
        await asyncio.sleep(0.1)  # the model asked for the tool; the turn may still grow
        final = await say(sdk, "book a table for four people", cid, model="host")  # → web1
        await asyncio.wait_for(speculative, 5)
        assert c.booked() == [{"party": 4}], "only the final request may book"
        assert final.text.startswith("The tool said:")
        assert len(upstream.records) == 3  # speculative, final, final with the tool result


async def test_owner_killed_mid_generation_final_elsewhere_answers_fresh_within_budget(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    upstream.push(slow_reply(words=200), slow_reply(words=5, ttft=0.2))
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL) as c:
        sdk = c.client()
        speculative = Heard()
        task = asyncio.create_task(say(sdk, "tell me a story", cid, speculative))  # web0 owns
        await wait_until(lambda: speculative.first is not None, within=5)
        c.servers[0].kill()  # SIGKILL mid-generation
        await asyncio.gather(task, return_exceptions=True)
        # The balancer takes web0 out; the final request reaches web1.
        final = await asyncio.wait_for(say(c.client(c.servers[1].url), "tell me a story", cid), 5)
        assert final.finish == "stop" and final.text.startswith("w0 ")
        assert final.ttft < 0.2 + 0.5 + 0.5, "upstream TTFT + the forwarding budget, no hang"
        assert len(upstream.records) == 2, "a fresh generation"
        assert metric(c.servers[1], "cvi_turns_routed_total", outcome="taken_over") == 1


@pytest.fixture
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test only, on a free port (the test stops it)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cvi-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_redis_stopped_mid_conversation_turns_go_on_in_process(
    tmp_path: Path,
    upstream: FakeUpstream,
    upstream_url: str,
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = private_redis
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, url) as c:
        sdk = c.client()
        first = await say(sdk, "hello there", cid)  # → web0, the owner
        again = await say(sdk, "hello there", cid)  # → web1, forwarded: a replay
        assert again.text == first.text and len(upstream.records) == 1
        warning = "turn coordination: Redis unreachable or slow"
        proc.send_signal(signal.SIGSTOP)  # Redis hangs: slow, not gone
        try:
            for n in range(4):  # web0, web1, web0, web1: every turn answered in time
                heard = await asyncio.wait_for(say(sdk, f"while Redis hangs {n}", cid), 5)
                assert heard.finish == "stop" and heard.text
                assert heard.ttft < 1.0, "at most one Redis deadline (250 ms) per turn"
            assert any(metric(s, "cvi_turns_coordination_up") == 0 for s in c.servers)
        finally:
            proc.send_signal(signal.SIGCONT)
        await wait_until(
            lambda: all(metric(s, "cvi_turns_coordination_up") == 1 for s in c.servers),
            within=8,
        )
        forwarded = metric(c.servers[1], "cvi_turns_routed_total", outcome="forwarded")
        await say(sdk, "hello there", cid)  # → web0
        await say(sdk, "hello there", cid)  # → web1: shared again
        assert metric(c.servers[1], "cvi_turns_routed_total", outcome="forwarded") > forwarded

        proc.terminate()  # Redis gone
        proc.wait(5)
        for n in range(4):
            heard = await asyncio.wait_for(say(sdk, f"and now turn {n}", cid), 5)
            assert heard.finish == "stop" and heard.text
        for server in c.servers:
            assert server.log_text().count(warning) <= 2, "one warning per outage"
        assert any(metric(s, "cvi_turns_coordination_up") == 0 for s in c.servers), (
            "a process that saw Redis go says so"
        )


async def test_workers_share_turns_and_report_metrics_together(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL, n=1, args=["--workers", "2"]) as c:
        sdk = c.client()
        turns = 4
        for n in range(turns):
            cid = conversation_id()
            upstream.push(slow_reply(words=10, gap=0.02, ttft=0.1))
            speculative = await say(sdk, f"story number {n}", cid)
            final = await say(sdk, f"story number {n}", cid)  # any worker: a replay
            assert final.text == speculative.text
        assert len(upstream.records) == turns, "every final was a replay, whichever worker"
        server = c.servers[0]
        # /metrics adds up both workers, whichever answers it.
        for _ in range(3):
            requests = metric(server, "cvi_chat_requests_total", persona="speaker", status="200")
            assert requests == 2 * turns
            assert metric(server, "cvi_turns_replayed_total") == turns


async def _exchange(address: str, data: bytes) -> bytes:
    """Send `data` to a turn listener; everything it answers until it closes (5 s at most)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_turn_listener_closes_bad_input_and_answers_its_own_deployment(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    cid = conversation_id()
    async with cluster(tmp_path, upstream_url, REDIS_TEST_URL, n=1) as c:
        await say(c.client(), "hello", cid)
        admin = redis.Redis.from_url(REDIS_TEST_URL)
        try:
            value = await admin.get(OWNER_PREFIX + cid)
            assert isinstance(value, bytes), "the conversation has an owner"
            owner = value.decode()
            assert await admin.pttl(OWNER_PREFIX + cid) > 0, "every key expires"
        finally:
            await admin.aclose()

        def request(token: str, raw: Any) -> bytes:
            body = {"token": token, "conversation_id": conversation_id(), "raw": raw}
            return frame(REQUEST, json.dumps(body).encode())

        good = {"model": "speaker", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        token = link_token((API_KEY,))
        assert await _exchange(owner, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert await _exchange(owner, frame(REQUEST, b"not json")) == b""
        assert await _exchange(owner, request("wrong-token", good)) == b""
        assert c.servers[0].log_text().count("without a valid request") == 1, "logged once"
        refused = await _exchange(owner, request(token, {"model": "nobody", "messages": []}))
        assert refused[:1] == REFUSED
        answer = await _exchange(owner, request(token, good))
        assert answer[:1] == ACCEPTED and answer.rstrip().endswith(b"data: [DONE]")
        assert (await say(c.client(), "hello again", cid)).finish == "stop"


async def test_turn_listener_is_bounded_and_refuses_past_its_cap_at_once(
    tmp_path: Path, upstream: FakeUpstream, upstream_url: str
) -> None:
    """Idle connections to the listener (each may wait 5 s for its request) cannot stall it:
    past CVI_MAX_CONNECTIONS a connection is refused at once, and the forwarder would answer
    that turn itself."""
    cid = conversation_id()
    async with cluster(
        tmp_path, upstream_url, REDIS_TEST_URL, n=1, env={"CVI_MAX_CONNECTIONS": "2"}
    ) as c:
        await say(c.client(), "hello", cid)
        admin = redis.Redis.from_url(REDIS_TEST_URL)
        try:
            value = await admin.get(OWNER_PREFIX + cid)
            assert isinstance(value, bytes)
            owner = value.decode()
        finally:
            await admin.aclose()
        host, _, port = owner.rpartition(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
        try:
            await asyncio.sleep(0.2)  # both are being served (waiting for their request)
            started = time.monotonic()
            answer = await _exchange(owner, b"")
            assert answer[:1] == REFUSED and b"busy" in answer
            assert time.monotonic() - started < 2.0
        finally:
            for _, writer in idle:
                writer.close()
        assert (await say(c.client(), "hello again", cid)).finish == "stop"
