"""The live feed as Server-Sent Events (`GET /api/conversations/{id}/events/stream`), read by an
httpx streaming client (and a raw socket) on a real server on loopback: the backlog then live
events, `Last-Event-ID` resuming with no gap and no duplicate, refusals in the OpenAI shape,
pings, the bounds (a slow consumer caught up from the store, a reader that stops closed after
the send timeout), and nothing left behind when the client or the server goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from cvi_agent.bus import InProcessBus, events_channel
from cvi_agent.conversations import feed as feed_module
from cvi_agent.conversations.feed import Live, event_feed
from cvi_agent.conversations.service import ConversationService
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.store import EventRecord, SqlStore
from cvi_agent.store.base import now
from tests.support import API_KEY, REDIS_TEST_URL, ServerFactory, eventually

TOKEN = "cb-token-feed-0123456789"
CID = "c-feed"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Message:
    """One SSE message as a client sees it (a ping is a message with only a comment)."""

    id: str | None = None
    event: str | None = None
    data: Any = None
    comments: list[str] = field(default_factory=list)


class SSEReader:
    """Parses `text/event-stream` lines into messages, one `next()` at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, within: float = 10.0, pings: bool = False) -> Message:
        """The next message (pings skipped unless `pings`)."""
        async with asyncio.timeout(within):
            while True:
                message = await self._message()
                if pings or message.comments == [] or message.data is not None:
                    return message

    async def _message(self) -> Message:
        message = Message()
        data: list[str] = []
        while True:
            line = await self._lines.__anext__()
            if line == "":
                if data or message.comments or message.event or message.id:
                    if data:
                        message.data = json.loads("\n".join(data))
                    return message
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                message.comments.append(value)
            elif name == "data":
                data.append(value)
            elif name == "id":
                message.id = value
            elif name == "event":
                message.event = value

    async def events(self, count: int) -> list[Message]:
        return [await self.next() for _ in range(count)]

    async def rest(self) -> list[str]:
        """Every line until the server ends the response."""
        return [line async for line in self._lines]


def stream(
    http: httpx.AsyncClient, cid: str = CID, headers: dict[str, str] | None = None, **params: Any
) -> Any:
    return http.stream(
        "GET",
        f"/api/conversations/{cid}/events/stream",
        headers={**AUTH, **(headers or {})},
        params=params,
    )


async def callback(http: httpx.AsyncClient, n: int, size: int = 0, cid: str = CID) -> None:
    """One distinct Tavus callback for the conversation: one stored event, published live."""
    body = {
        "event_type": "application.perception_analysis",
        "conversation_id": cid,
        "timestamp": f"2025-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
        "properties": {"n": n, **({"padding": "x" * size} if size else {})},
    }
    resp = await http.post("/callbacks/tavus", params={"token": TOKEN}, json=body)
    assert resp.status_code == 200, resp.text


def numbers(messages: list[Message]) -> list[int]:
    return [m.data["payload"]["properties"]["n"] for m in messages]


def service(server: LoopbackServer) -> ConversationService:
    app = cast(FastAPI, server.server.config.app)
    conversations: ConversationService = app.state.conversations
    return conversations


async def subscribers(server: LoopbackServer) -> int:
    return service(server).bus.subscribers(events_channel(CID))


async def server_tasks(server: LoopbackServer) -> Counter[str]:
    """What runs on the server's event loop, by coroutine name."""

    async def names() -> Counter[str]:
        return Counter(getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks())

    assert server.loop is not None
    future = asyncio.run_coroutine_threadsafe(names(), server.loop)
    return await asyncio.wrap_future(future)


@pytest.mark.parametrize("bus", ["inprocess", pytest.param("redis", marks=pytest.mark.redis)])
async def test_backlog_then_live_events(serve: ServerFactory, bus: str) -> None:
    """On the in-process bus, and on Redis (where the subscription is confirmed before the
    backlog is read)."""
    cid = f"c-feed-{uuid.uuid4().hex[:8]}"  # Redis is shared: a channel of this test's own
    server = serve(None, callback_token=TOKEN, redis_url=REDIS_TEST_URL if bus == "redis" else None)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await callback(http, 0, cid=cid)
        await callback(http, 1, cid=cid)
        async with stream(http, cid) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-store"
            feed = SSEReader(resp)
            backlog = await feed.events(2)
            assert numbers(backlog) == [0, 1]
            assert [m.event for m in backlog] == [None, None]  # EventSource's `message` type
            assert all(m.id == str(m.data["id"]) for m in backlog)
            live = await feed.next()
            assert live.event == "live" and live.data == {"backlog": 2} and live.id is None

            for n in (2, 3, 4):
                await callback(http, n, cid=cid)
            await callback(http, 4, cid=cid)  # a duplicate delivery is stored once, published once
            await callback(http, 5, cid=cid)
            events = await feed.events(4)
            assert numbers(events) == [2, 3, 4, 5]
            ids = [int(m.id or 0) for m in backlog + events]
            assert ids == sorted(set(ids)), "each event once, in order"
            assert events[0].data["kind"] == "application.perception_analysis"
            assert events[0].data["source"] == "callback"


async def test_last_event_id_resumes_with_no_gap_and_no_duplicate(serve: ServerFactory) -> None:
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        for n in range(3):
            await callback(http, n)
        async with stream(http) as resp:
            feed = SSEReader(resp)
            seen = await feed.events(3)
            assert (await feed.next()).event == "live"
            await callback(http, 3)
            seen.append(await feed.next())
        last = seen[-1].id
        assert last is not None
        for n in range(4, 8):  # while the client is away
            await callback(http, n)

        async with stream(http, headers={"Last-Event-ID": last}) as resp:
            feed = SSEReader(resp)
            missed = await feed.events(4)
            live = await feed.next()
            await callback(http, 8)
            after = await feed.next()
        assert numbers(seen + missed + [after]) == list(range(9)), "no gap, no duplicate"
        assert live.event == "live" and live.data == {"backlog": 4}

        # `?after=` works too; the header wins over it (an EventSource reconnecting resends
        # the URL it was opened with, and the header carries what it saw since)
        async with stream(http, after=seen[1].id) as resp:
            assert numbers(await SSEReader(resp).events(2)) == [2, 3]
        async with stream(http, headers={"Last-Event-ID": missed[-1].id or ""}, after=0) as resp:
            reader = SSEReader(resp)
            assert numbers([await reader.next()]) == [8]
            assert (await reader.next()).data == {"backlog": 1}


async def test_refusals_in_the_openai_shape(serve: ServerFactory) -> None:
    server = serve(None, callback_token=TOKEN)
    path = f"/api/conversations/{CID}/events/stream"
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await callback(http, 0)
        missing = await http.get(path)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        wrong = await http.get(path, headers={"Authorization": "Bearer wrong-key"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        in_url = await http.get(path, params={"key": API_KEY})  # never from the URL
        assert in_url.status_code == 401
        unknown = await http.get("/api/conversations/nope/events/stream", headers=AUTH)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "conversation_not_found"
        for headers, params in (
            ({"Last-Event-ID": "abc"}, {}),
            ({"Last-Event-ID": "-1"}, {}),
            ({"Last-Event-ID": str(2**63)}, {}),
            ({}, {"after": "1e3"}),
            ({}, {"after": "٣"}),  # a digit, but not an ASCII one
        ):
            bad = await http.get(path, headers={**AUTH, **headers}, params=params)
            assert bad.status_code == 400, (headers, params, bad.text)
            assert bad.json()["error"]["code"] == "invalid_after"
        async with stream(http, headers={"Last-Event-ID": ""}) as resp:  # no cursor
            assert resp.status_code == 200
            assert numbers([await SSEReader(resp).next()]) == [0]


async def test_client_going_away_leaves_nothing_behind(serve: ServerFactory) -> None:
    """The stream's tasks and its bus subscription end when the client disconnects."""
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await callback(http, 0)
        async with stream(http) as resp:  # warm up: sse-starlette starts its shutdown watcher
            await SSEReader(resp).next()
    await eventually(lambda: _equal(subscribers(server), 0))
    baseline = await server_tasks(server)

    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        async with stream(http) as resp:
            feed = SSEReader(resp)
            await feed.next()
            assert (await feed.next()).event == "live"
            assert await subscribers(server) == 1
            during = await server_tasks(server)
            assert sum(during.values()) > sum(baseline.values())

    async def back_to_baseline() -> bool:
        return await server_tasks(server) == baseline and await subscribers(server) == 0

    try:
        await eventually(back_to_baseline, 5)
    except AssertionError:
        raise AssertionError(
            f"left behind: {(await server_tasks(server)) - baseline}, "
            f"subscribers {await subscribers(server)}"
        ) from None


async def _equal(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_pings_keep_an_idle_stream_open(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "PING_SECONDS", 0.2)
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await callback(http, 0)
        async with stream(http) as resp:
            feed = SSEReader(resp)
            await feed.next()
            assert (await feed.next()).event == "live"
            pings = [await feed.next(within=2, pings=True) for _ in range(3)]
            assert all(p.data is None and p.comments[0].startswith("ping") for p in pings)
            await callback(http, 1)  # and the stream still carries events
            assert numbers([await feed.next()]) == [1]


async def test_a_stopped_reader_is_closed_after_the_send_timeout(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that opens the stream and never reads: the server's buffers fill, a send
    waits, and after SEND_TIMEOUT the stream is closed (subscription freed, one info line)."""
    monkeypatch.setattr(feed_module, "SEND_TIMEOUT", 1.0)
    caplog.set_level(logging.INFO, logger="cvi_agent.conversations.feed")
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for n in range(48):  # 12 MB of backlog: more than loopback's socket buffers hold
            await callback(http, n, size=256 * 1024)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        request = (
            f"GET /api/conversations/{CID}/events/stream HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        await eventually(lambda: _equal(subscribers(server), 1))
        started = time.monotonic()
        await eventually(lambda: _equal(subscribers(server), 0), within=15)
        assert time.monotonic() - started < 10
        assert any("took nothing for 1s" in r.getMessage() for r in caplog.records)
        assert not any(r.exc_info for r in caplog.records), "no traceback"
    finally:
        sock.close()


async def test_server_shutdown_ends_the_stream_cleanly(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SIGTERM sse-starlette sets its shutdown flag; the feed watching it ends, so the
    response finishes properly (a complete chunked body) instead of being cut off."""
    server = serve(None, callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await callback(http, 0)
        async with stream(http) as resp:
            feed = SSEReader(resp)
            await feed.next()
            assert (await feed.next()).event == "live"
            monkeypatch.setattr(AppStatus, "should_exit", True)  # what uvicorn's SIGTERM does
            started = time.monotonic()
            rest = await asyncio.wait_for(feed.rest(), 10)  # it ends, with no protocol error
            assert time.monotonic() - started < 5
            assert not any(line.startswith("data:") for line in rest)
    monkeypatch.setattr(AppStatus, "should_exit", False)
    await eventually(lambda: _equal(subscribers(server), 0))


# -- the shared feed itself (the websocket and the SSE stream both run it) ----------------------


async def _add(store: SqlStore, bus: InProcessBus, n: int) -> None:
    """What `ConversationService.add_events` does: store, then publish what is new."""
    event = EventRecord(
        conversation_id=CID,
        source="api",
        kind="test.event",
        dedupe_key=f"feed-{n}",
        payload={"n": n},
        occurred_at=now(),
    )
    for new in await store.add_events([event]):
        await bus.publish(events_channel(CID), new.as_dict())


async def test_a_slow_consumer_is_caught_up_from_the_store(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer stops pulling while far more events are published than its queue holds:
    the bus drops them for it (a gap), and the feed reads them back from the store (page by
    page), each once and in order, then goes on live."""
    monkeypatch.setattr(feed_module, "QUEUE_SIZE", 4)
    monkeypatch.setattr(feed_module, "BATCH", 4)  # the store is read page by page
    bus = InProcessBus()
    await store.upsert_conversation(CID)
    for n in range(3):
        await _add(store, bus, n)
    feed = event_feed(store, bus, CID, after=0)
    got: list[int] = []

    async def pull() -> Any:
        return await asyncio.wait_for(feed.__anext__(), 10)

    try:
        for _ in range(3):
            got.append((await pull())["payload"]["n"])
        assert await pull() == Live(backlog=3)
        for n in range(3, 60):  # 57 events while nobody pulls: the queue holds 4
            await _add(store, bus, n)
        for _ in range(57):
            got.append((await pull())["payload"]["n"])
        await _add(store, bus, 60)
        got.append((await pull())["payload"]["n"])
        assert got == list(range(61)), "every event once, in order"
        assert bus.subscribers(events_channel(CID)) == 1
    finally:
        await feed.aclose()
    assert bus.subscribers(events_channel(CID)) == 0, "closing the feed unsubscribes"


async def test_the_feed_resumes_after_a_cursor_and_stops_when_told(store: SqlStore) -> None:
    bus = InProcessBus()
    await store.upsert_conversation(CID)
    for n in range(5):
        await _add(store, bus, n)
    first = (await store.list_events(CID, order="id"))[1].id
    assert first is not None
    stop = anyio.Event()
    items: list[Any] = []

    async def consume() -> None:
        async for item in event_feed(store, bus, CID, after=first, stop=stop):
            items.append(item)

    task = asyncio.create_task(consume())
    await eventually(lambda: _true(any(isinstance(i, Live) for i in items)))
    await _add(store, bus, 5)
    await eventually(lambda: _true(len(items) == 5))
    stop.set()
    await asyncio.wait_for(task, 5)  # ends by itself: no cancellation needed
    assert [i["payload"]["n"] for i in items if not isinstance(i, Live)] == [2, 3, 4, 5]
    assert items[3] == Live(backlog=3)
    assert bus.subscribers(events_channel(CID)) == 0


async def _true(value: bool) -> bool:
    return value


class RacingStore:
    """The store, except that an event is stored (and published) just as the feed first reads
    its backlog: the event comes both ways, from the store and from the bus."""

    def __init__(self, store: SqlStore, bus: InProcessBus) -> None:
        self.store = store
        self.bus = bus
        self.raced = False

    async def list_events(self, *args: Any, **kwargs: Any) -> list[EventRecord]:
        if not self.raced:
            self.raced = True
            await _add(self.store, self.bus, 99)
        return await self.store.list_events(*args, **kwargs)


async def test_an_event_stored_during_the_hand_over_is_sent_once(store: SqlStore) -> None:
    bus = InProcessBus()
    await store.upsert_conversation(CID)
    await _add(store, bus, 0)
    racing = cast(SqlStore, RacingStore(store, bus))
    feed = event_feed(racing, bus, CID)
    try:
        items: list[Any] = [await asyncio.wait_for(feed.__anext__(), 10) for _ in range(3)]
        assert [i["payload"]["n"] for i in items[:2]] == [0, 99]
        assert items[2] == Live(backlog=2)
        await _add(store, bus, 1)
        following: Any = await asyncio.wait_for(feed.__anext__(), 10)
        assert following["payload"]["n"] == 1, "the bus's copy of 99 was not sent again"
    finally:
        await feed.aclose()
