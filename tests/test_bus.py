"""The bus, in-process and on the real Redis: fan-out, gaps instead of blocking, request/reply."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from cvi_agent.bus import Bus, InProcessBus, RedisBus, make_bus, request
from tests.support import REDIS_TEST_URL


async def redis_bus(name: str = "cvi-test") -> RedisBus:
    bus = RedisBus(REDIS_TEST_URL, client_name=f"{name}-{uuid.uuid4().hex[:8]}")
    try:
        await bus.start()
    except (OSError, redis.ConnectionError) as exc:
        await bus.aclose()
        pytest.fail(f"Redis is required at {REDIS_TEST_URL} ({exc}); start it, see README")
    return bus


@pytest.fixture(params=["inprocess", pytest.param("redis", marks=pytest.mark.redis)])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    b: Bus = InProcessBus() if request.param == "inprocess" else await redis_bus()
    await b.start()
    yield b
    await b.aclose()


def channel() -> str:
    return f"cvi:test:{uuid.uuid4().hex}"


async def test_fan_out_in_order(bus: Bus) -> None:
    ch = channel()
    assert await bus.publish(ch, {"n": 0}) == 0
    async with bus.subscribe(ch) as a, bus.subscribe(ch) as b:
        assert await bus.publish(ch, {"n": 1}) >= 1
        for n in range(2, 6):
            await bus.publish(ch, {"n": n})
        got_a = [await a.next(max_wait=5) for _ in range(5)]
        got_b = [await b.next(max_wait=5) for _ in range(5)]
    assert got_a == got_b == [{"n": n} for n in range(1, 6)]
    assert await bus.publish(ch, {"n": 9}) == 0
    assert bus.subscribers(ch) == 0


async def test_slow_subscriber_gets_a_gap_not_a_blocked_publisher(bus: Bus) -> None:
    ch = channel()
    async with bus.subscribe(ch, maxsize=3) as sub:
        for n in range(10):
            await bus.publish(ch, {"n": n})
        await asyncio.sleep(0.2)  # let the Redis reader deliver
        got = [await sub.next(max_wait=5) for _ in range(4)]
        assert got == [{"n": 0}, {"n": 1}, {"n": 2}, None]
        assert sub.dropped == 7
        await bus.publish(ch, {"n": 10})
        assert await sub.next(max_wait=5) == {"n": 10}
        with pytest.raises(TimeoutError):
            await sub.next(max_wait=0.05)


async def test_request_reply(bus: Bus) -> None:
    ch = channel()

    async def responder() -> None:
        async with bus.subscribe(ch) as sub:
            ready.set()
            msg = await sub.next()
            assert msg is not None
            await bus.publish(msg["reply_to"], {"ok": True, "echo": msg["x"]})

    ready = asyncio.Event()
    task = asyncio.create_task(responder())
    await asyncio.wait_for(ready.wait(), 5)
    receivers, reply = await request(bus, ch, {"x": 42}, uuid.uuid4().hex, 5)
    await task
    assert receivers >= 1 and reply == {"ok": True, "echo": 42}
    assert await request(bus, ch, {"x": 1}, uuid.uuid4().hex, 0.2) == (0, None)


@pytest.mark.redis
async def test_redis_spans_processes_and_signals_a_gap_on_reconnect() -> None:
    a, b = await redis_bus("cvi-test-a"), await redis_bus("cvi-test-b")
    admin = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        ch = channel()
        async with a.subscribe(ch) as sub:
            assert await b.publish(ch, {"from": "b"}) == 1  # one process listening
            assert await sub.next(max_wait=5) == {"from": "b"}
            # Kill a's pub/sub connection from the server side, as a Redis restart would.
            clients = await admin.client_list()
            names = [c for c in clients if c.get("name", "").startswith("cvi-test-a")]
            killed = 0
            for c in names:
                if "subscribe" in c.get("cmd", "") or int(c.get("sub", 0)) > 0:
                    await admin.client_kill_filter(_id=c["id"])
                    killed += 1
            assert killed == 1
            assert await sub.next(max_wait=10) is None  # the gap marker
            for _ in range(100):  # resubscribed by redis-py after reconnecting
                if await b.publish(ch, {"after": True}) == 1:
                    break
                await asyncio.sleep(0.05)
            assert await sub.next(max_wait=5) == {"after": True}
    finally:
        await admin.aclose()
        await a.aclose()
        await b.aclose()


@pytest.mark.redis
async def test_redis_subscription_churn_never_misses_a_message() -> None:
    """Entering a subscription means Redis confirmed it, even right after an unsubscribe."""
    a, b = await redis_bus("cvi-test-churn-a"), await redis_bus("cvi-test-churn-b")
    try:
        ch = channel()
        for i in range(25):
            async with a.subscribe(ch) as first:
                async with a.subscribe(ch) as second:
                    assert await b.publish(ch, {"i": i}) == 1
                    assert await first.next(max_wait=5) == {"i": i}
                    assert await second.next(max_wait=5) == {"i": i}
    finally:
        await a.aclose()
        await b.aclose()


def test_make_bus() -> None:
    assert type(make_bus(None)) is InProcessBus
    assert isinstance(make_bus(REDIS_TEST_URL), RedisBus)
