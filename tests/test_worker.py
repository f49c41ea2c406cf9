"""Leases and the worker: one bot per conversation, heartbeats, takeover, failure backoff.

In-process tests run on SQLite and the real PostgreSQL; the scale-out test runs real
`cvi-agent serve` and `cvi-agent worker` processes against PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from cvi_agent.bot.worker import BotSpec, Worker
from cvi_agent.bus import InProcessBus, commands_channel, request
from cvi_agent.protocol.interactions import Echo
from cvi_agent.store import EventRecord, Leases, SqlStore, open_store
from tests.bots import RecordingBot


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s")
        await asyncio.sleep(0.05)


async def test_claims_are_exclusive_and_expire(store: SqlStore) -> None:
    leases = Leases(store)
    for n in range(6):
        await leases.offer(f"c{n}", {"conversation_url": f"ws://room/{n}"})
    await leases.offer("c0", {"conversation_url": "ws://room/0", "persona": "echo"})  # idempotent
    second = await open_store(store.url)  # another process's engine
    try:
        other = Leases(second)
        a, b = await asyncio.gather(leases.claim("wa", 30, 4), other.claim("wb", 30, 4))
    finally:
        await second.aclose()
    ids_a = {lease.conversation_id for lease in a}
    ids_b = {lease.conversation_id for lease in b}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 6
    assert len({lease.owner for lease in a + b}) == 6, "every claim has its own owner token"
    assert await leases.claim("wc", 30, 10) == []
    c0 = await leases.get("c0")
    assert c0 is not None and c0.payload["persona"] == "echo" and c0.held()

    # Renewing keeps what is held; a lease that expired is claimed by someone else.
    first = a[0]
    assert await leases.renew([first.owner or ""], 0.2) == {first.owner}
    await asyncio.sleep(0.3)
    [taken] = await leases.claim("wc", 30, 10)
    assert taken.conversation_id == first.conversation_id and taken.owner != first.owner
    assert await leases.renew([first.owner or ""], 30) == set(), "the old owner lost it"
    assert not await leases.finish(first.conversation_id, first.owner)
    assert await leases.release(taken.owner or "", retry_in=60)
    assert await leases.claim("wd", 30, 10) == []  # backing off
    assert await leases.finish(taken.conversation_id)
    assert await leases.get(taken.conversation_id) is None


def _factory(bots: dict[str, list[RecordingBot]], fail: set[str] | None = None) -> Any:
    def make(spec: BotSpec) -> RecordingBot:
        bot = RecordingBot(spec)
        if fail and spec.conversation_id in fail:

            async def broken(url: str, meeting_token: str | None = None) -> None:
                raise RuntimeError("join failed")

            bot.start = broken  # type: ignore[method-assign]
        bots.setdefault(spec.conversation_id, []).append(bot)
        return bot

    return make


@pytest.fixture
async def workers(store: SqlStore) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    started: list[Worker] = []
    bus = InProcessBus()

    async def start(bots: dict[str, list[RecordingBot]], **kw: Any) -> Worker:
        published: list[EventRecord] = []

        async def publish(record: EventRecord) -> None:
            published.append(record)

        worker = Worker(
            store=store,
            bus=bus,
            personas={},
            publish=publish,
            factory=_factory(bots, kw.pop("fail", None)),
            poll_interval=0.05,
            lease_seconds=kw.pop("lease_seconds", 0.6),
            **kw,
        )
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.aclose()


async def test_worker_runs_commands_and_hands_over(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await store.upsert_conversation("c1", persona="echo")
    await leases.offer("c1", {"conversation_url": "ws://room/c1"})
    w1 = await workers(bots, worker_id="w1")

    async def running(worker: Worker) -> bool:
        rb = worker.running.get("c1")
        return rb is not None and bots["c1"][-1].started.is_set()

    await eventually(lambda: running(w1))
    bus = w1.bus

    async def echo(text: str) -> dict[str, Any] | None:
        command = {"op": "send", "interaction": {"type": "echo", "text": text}}
        _, reply = await request(bus, commands_channel("c1"), command, f"r-{text}", 2)
        return reply

    reply = await eventually(lambda: echo("one"))
    assert reply["ok"] and reply["worker"] == "w1"
    assert bots["c1"][0].sent == [Echo(text="one")]
    assert (await echo("one")) == reply, "a repeated command id is answered, not re-sent"
    assert len(bots["c1"][0].sent) == 1

    # Heartbeats keep the lease past its length; a second worker does not take it.
    w2 = await workers(bots, worker_id="w2")
    await asyncio.sleep(1.5)
    assert "c1" not in w2.running and len(bots["c1"]) == 1

    # w1 stalls (no heartbeats: as if killed): w2 takes over after the lease expires, and w1
    # stops its bot when it finds its lease gone.
    w1._stopping = True
    assert w1._task is not None
    w1._task.cancel()
    await eventually(lambda: running(w2))
    assert len(bots["c1"]) == 2
    await w1.heartbeat()
    await eventually(lambda: _value(bots["c1"][0].stopped == "lease_lost"))
    reply = await eventually(lambda: echo("two"))
    assert reply["worker"] == "w2" and bots["c1"][1].sent == [Echo(text="two")]

    # Told to stop (as `POST …/end` does): the bot stops and its lease is removed.
    await leases.finish("c1")
    await bus.publish(commands_channel("c1"), {"op": "stop", "reason": "api_end"})
    await eventually(lambda: _value(bots["c1"][1].stopped == "api_end"))
    await eventually(lambda: _value("c1" not in w2.running))
    assert await leases.get("c1") is None
    kinds = [e.kind for e in await store.list_events("c1", order="id")]
    assert kinds.count("worker.started") == 2


async def _value(value: bool) -> bool:
    return value


async def test_failing_bot_backs_off_and_ended_conversations_are_skipped(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await leases.offer("bad", {"conversation_url": "ws://room/bad"})
    await store.set_conversation_status("over", "ended")
    await leases.offer("over", {"conversation_url": "ws://room/over"})
    await workers(bots, worker_id="w1", fail={"bad"})

    async def failed_once() -> bool:
        lease = await leases.get("bad")
        return lease is not None and lease.payload.get("attempts") == 1

    await eventually(failed_once)
    lease = await leases.get("bad")
    assert lease is not None and not lease.held() and lease.expires_at > time.time() + 1
    assert "join failed" in lease.payload["last_error"]
    await eventually(lambda: _none(leases.get("over")))
    assert "over" not in bots
    kinds = [e.kind for e in await store.list_events("bad", order="id")]
    assert "worker.failed" in kinds


async def _none(value: Awaitable[Any]) -> bool:
    return (await value) is None


async def test_graceful_shutdown_releases_at_once(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await leases.offer("c1", {"conversation_url": "ws://room/c1"})
    w1 = await workers(bots, worker_id="w1", lease_seconds=30)
    await eventually(lambda: _value("c1" in w1.running))
    await w1.aclose()
    assert bots["c1"][0].stopped == "worker_shutdown"
    lease = await leases.get("c1")
    assert lease is not None and lease.owner is None and not lease.held()
    w2 = await workers(bots, worker_id="w2", lease_seconds=30)
    await eventually(lambda: _value("c1" in w2.running))  # no 30 s wait
