"""The OpenAI-compatible streaming client against the fake upstream on real uvicorn, over each
direct transport (httptools, aiohttp): both must pass the same tests. The proxy path has its
own file (test_llm_upstream_proxy.py)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from cvi_agent.llm.upstream.client import ChatStreamClient, TransportName
from cvi_agent.llm.upstream.errors import UpstreamConnectionError, UpstreamHTTPError
from tests.support import wait_until
from tests.upstream_support import PARAMS, assert_story_relayed, collect


@pytest.fixture(params=["httptools", "aiohttp"])
def transport(request: pytest.FixtureRequest) -> TransportName:
    """Each direct transport in turn."""
    name: TransportName = request.param
    return name


@pytest.fixture
def short_keepalive_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with LoopbackServer(fake, timeout_keep_alive=0.2) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


async def test_events_and_request_on_the_wire(
    upstream: FakeUpstream, transport: TransportName
) -> None:
    client = ChatStreamClient(upstream.url + "/v1", "sk-test", transport=transport)  # type: ignore[attr-defined]
    await assert_story_relayed(client, upstream)


async def test_keep_alive_reuse_and_stale_connections(
    short_keepalive_upstream: FakeUpstream, transport: TransportName
) -> None:
    fake = short_keepalive_upstream
    client = ChatStreamClient(fake.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        for _ in range(3):
            fake.push(fake.reply("one two"))
            assert len(await collect(client)) == 4  # two words, finish, usage
        await asyncio.sleep(0.5)  # the upstream closes our idle connection meanwhile
        fake.push(fake.reply("still here"))
        events = await collect(client)
    finally:
        await client.aclose()
    assert events[0]["choices"][0]["delta"]["content"] == "still "


async def test_http_errors_carry_the_upstream_message(
    upstream: FakeUpstream, transport: TransportName
) -> None:
    upstream.push(
        Plan(status=429, error_body={"error": {"message": "slow down", "type": "rate_limit"}})
    )
    client = ChatStreamClient(upstream.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        with pytest.raises(UpstreamHTTPError) as caught:
            await client.stream(PARAMS)
        assert caught.value.status == 429 and caught.value.message == "slow down"
        upstream.push(upstream.reply("fine again"))
        assert len(await collect(client)) == 4  # the connection is usable after an error
    finally:
        await client.aclose()


async def test_malformed_event_and_broken_connection(
    upstream: FakeUpstream, transport: TransportName
) -> None:
    client = ChatStreamClient(upstream.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        upstream.push(Plan(raw_chunks=[b'data: {"choices": []}\n\n', b"data: {not json\n\n"]))
        with pytest.raises(UpstreamConnectionError, match="not JSON"):
            await collect(client)
        upstream.push(Plan(steps=[ReplyStep(content="a"), ReplyStep(content="b")], reset_after=1))
        with pytest.raises(UpstreamConnectionError):
            await collect(client)
    finally:
        await client.aclose()


async def test_closing_early_closes_the_upstream_connection(
    upstream: FakeUpstream, transport: TransportName
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ", sleep=0.05) for i in range(50)]))
    client = ChatStreamClient(upstream.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        stream = await client.stream(PARAMS)
        async for _ in stream:
            break
        await stream.aclose()
        closed = time.monotonic()
        await wait_until(lambda: upstream.records[-1].disconnected is not None, within=2)
    finally:
        await client.aclose()
    disconnected = upstream.records[-1].disconnected
    assert disconnected is not None and disconnected - closed < 0.5


async def test_unreachable_upstream(transport: TransportName) -> None:
    client = ChatStreamClient("http://127.0.0.1:9/v1", "k", connect_timeout=1, transport=transport)
    try:
        with pytest.raises(UpstreamConnectionError, match="could not connect"):
            await client.stream(PARAMS)
    finally:
        await client.aclose()


# (Without a conversation id the caller gets a 502 instead: tests/test_llm_failure.py.)
@pytest.mark.parametrize("conversation", ["conv-fail"])
async def test_upstream_failure_speaks_the_fallback_line(
    client: Any, upstream: FakeUpstream, conversation: str | None
) -> None:
    upstream.push(Plan(status=500))
    headers = {"x-conversation-id": conversation} if conversation else {}
    stream = await client.chat.completions.create(
        model="storyteller",
        stream=True,
        messages=[{"role": "user", "content": "a story please"}],
        extra_headers=headers,
    )
    parts, finish = [], None
    async with stream:
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == "Hmm, let me gather my thoughts for a second."
    assert finish == "stop"


async def test_connection_reused_when_the_body_ends_after_done(
    upstream: FakeUpstream, transport: TransportName
) -> None:
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    upstream.push(Plan(raw_chunks=[chunk, b"data: [DONE]\n\n"], end_delay=0.2))
    client = ChatStreamClient(upstream.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        started = time.monotonic()
        assert len(await collect(client)) == 1
        assert time.monotonic() - started < 0.15, "the reader must not wait for the body's end"
        await asyncio.sleep(0.3)
        upstream.push(upstream.reply("again"))
        await collect(client)
        upstream.push(upstream.reply("and again"))
        await collect(client)
    finally:
        await client.aclose()
    clients = [r.client for r in upstream.records]
    assert clients[0] is not None and clients[0] == clients[1] == clients[2]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed key and certificate for `localhost`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


async def test_https_upstream(certificate: tuple[Path, Path], transport: TransportName) -> None:
    key, cert = certificate
    fake = FakeUpstream()
    with LoopbackServer(fake, ssl_keyfile=str(key), ssl_certfile=str(cert)) as server:
        base = f"https://localhost:{server.port}/v1"
        trusted = ssl.create_default_context(cafile=str(cert))
        client = ChatStreamClient(base, "k", ssl_context=trusted, transport=transport)
        untrusted = ChatStreamClient(base, "k", transport=transport)
        try:
            fake.push(fake.reply("over tls"), fake.reply("twice"))
            events = await collect(client)
            assert events[0]["choices"][0]["delta"]["content"] == "over "
            await collect(client)
            assert fake.records[0].client == fake.records[1].client  # kept alive
            with pytest.raises(UpstreamConnectionError, match="could not connect"):
                await untrusted.stream(PARAMS)  # a self-signed certificate is refused
        finally:
            await client.aclose()
            await untrusted.aclose()


async def test_backpressure_then_reuse(upstream: FakeUpstream, transport: TransportName) -> None:
    """A reader that falls behind pauses the socket; the connection still serves the next one."""
    upstream.push(upstream.reply(" ".join(f"w{i}" for i in range(300))))
    client = ChatStreamClient(upstream.url + "/v1", "k", transport=transport)  # type: ignore[attr-defined]
    try:
        stream = await client.stream(PARAMS)
        async with stream:
            await asyncio.sleep(0.3)  # everything arrives while nobody reads
            events = [event async for event in stream]
        assert len(events) == 302  # 300 words, finish, usage
        upstream.push(upstream.reply(" ".join(f"w{i}" for i in range(300))))
        stream = await client.stream(PARAMS)
        async with stream:
            await asyncio.sleep(0.3)
            async for _ in stream:
                break  # stop reading early, with the whole reply received
        upstream.push(upstream.reply("next one"))
        assert len(await asyncio.wait_for(collect(client), 5)) == 4
    finally:
        await client.aclose()
    assert upstream.records[0].client == upstream.records[1].client
