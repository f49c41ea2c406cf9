"""Interactions through both paths (`conversations/delivery.py`) on real uvicorn: Tavus's
send-app-message (the fake Tavus on loopback) and the bot (the in-process worker and a
recording test bot), every documented failure, ordering, idempotency, the rate limit, and the
record; the Redis-backed tests run two services against one Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from websockets.asyncio.client import connect

from cvi_agent.conversations.ordering import RedisTurns, TurnTimeout
from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.protocol.interactions import Echo
from cvi_agent.store import VideoRecord, open_store
from cvi_agent.tavus.ratelimit import key_id
from tests.bots import BOTS, RecordingBot
from tests.support import (
    API_KEY,
    CALLBACK_TOKEN,
    REDIS_TEST_URL,
    TAVUS_KEY,
    ServerFactory,
    eventually,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def app_defaults() -> dict[str, Any]:
    """The tests' rooms are ws:// local rooms on loopback; each server its own database (and so
    its own bots), unless a test shares one."""
    return {"local_rooms": True, "own_database": True}


@pytest.fixture
def standin() -> Iterator[FakeTavus]:
    """A keyless stand-in for Tavus's API (what the simulator runs for its local replica)."""
    fake = FakeTavus(api_key=None)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


async def create(http: httpx.AsyncClient, **body: Any) -> str:
    resp = await http.post("/api/conversations", json={"persona": "echo", **body}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    cid: str = resp.json()["conversation"]["id"]
    return cid


async def bot_for(cid: str) -> RecordingBot:
    async def started() -> RecordingBot | None:
        bots = BOTS.get(cid)
        return bots[-1] if bots and bots[-1].started.is_set() else None

    bot: RecordingBot = await eventually(started)
    return bot


async def interact(
    http: httpx.AsyncClient,
    cid: str,
    body: dict[str, Any],
    *,
    via: str | None = None,
    key: str | None = None,
) -> httpx.Response:
    headers = dict(AUTH)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await http.post(
        f"/api/conversations/{cid}/interactions",
        json=body,
        params={"via": via} if via else None,
        headers=headers,
    )


async def events(http: httpx.AsyncClient, cid: str) -> list[dict[str, Any]]:
    record = (await http.get(f"/api/conversations/{cid}", headers=AUTH)).json()
    found: list[dict[str, Any]] = record["events"]
    return found


def sends(fake: FakeTavus, cid: str) -> int:
    return len(fake.requests("POST", f"/v2/conversations/{cid}/send-app-message"))


def texts(fake: FakeTavus, cid: str) -> list[str]:
    return [m["properties"]["text"] for m in fake.app_messages.get(cid, [])]


# -- the REST path and the record -------------------------------------------------------------


async def test_rest_interaction_reaches_tavus_and_the_record(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    """`bot: false`, a first-class mode: no bot, no extra participant, interactions over
    Tavus's API, each one in the record (and on the live feed) where the bot's would be."""
    server = app_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http, bot=False)
        [made] = fake_tavus.requests("POST", "/v2/conversations")
        assert "max_participants" not in made.body  # no seat taken for a bot
        ws_url = server.url.replace("http://", "ws://")
        async with connect(f"{ws_url}/api/conversations/{cid}/live?key={API_KEY}") as ws:
            while json.loads(await ws.recv()).get("type") != "live":
                pass
            resp = await interact(http, cid, {"type": "echo", "text": "Hello over REST"})
            assert resp.status_code == 200, resp.text
            live = json.loads(await asyncio.wait_for(ws.recv(), 5))
        body = resp.json()
        message = Echo(text="Hello over REST").to_message(cid)
        assert body["via"] == "rest" and body["delivered"] is True
        assert body["delivery"] == "delivered" and body["message"] == message
        assert body["tavus"] == {"status": "delivered"} and body["attempts"] == 1
        assert fake_tavus.app_messages[cid] == [message]
        [seen] = fake_tavus.requests("POST", f"/v2/conversations/{cid}/send-app-message")
        assert seen.headers["x-api-key"] == TAVUS_KEY

        [stored] = [e for e in await events(http, cid) if e["kind"].startswith("interaction.")]
        assert live["event"]["id"] == stored["id"]
        assert stored["source"] == "api" and stored["kind"] == "interaction.conversation.echo"
        assert stored["payload"]["properties"] == {"modality": "text", "text": "Hello over REST"}
        delivery = stored["payload"]["delivery"]
        assert delivery["via"] == "rest" and delivery["status"] == "delivered"
        assert delivery["http_status"] == 200 and delivery["tavus"] == {"status": "delivered"}

        # Tavus's callbacks make the rest of the record, as without a bot they always do.
        assert await fake_tavus.send_callback(cid, "system.replica_joined", {}) == 200
        kinds = {e["kind"] for e in await events(http, cid)}
        assert "system.replica_joined" in kinds


async def test_the_path_is_chosen_by_setting_and_per_request(
    app_server: ServerFactory, fake_tavus: FakeTavus, standin: FakeTavus
) -> None:
    server = app_server()
    bots = app_server(interactions_via="bot")
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        tavus_cid = await create(http)  # a Tavus conversation with a bot
        bot = await bot_for(tavus_cid)
        auto = await interact(http, tavus_cid, {"type": "echo", "text": "auto"})
        assert auto.json()["via"] == "rest"
        by_bot = await interact(http, tavus_cid, {"type": "echo", "text": "bot"}, via="bot")
        assert by_bot.status_code == 200 and by_bot.json()["via"] == "bot"
        assert by_bot.json()["worker"]
        assert texts(fake_tavus, tavus_cid) == ["auto"]
        assert [i.model_dump()["text"] for i in bot.sent] == ["bot"]

        # A local room: the bot by default; Tavus's API only through a stand-in.
        local = await create(http, conversation_url="ws://127.0.0.1:9/room-a")
        local_bot = await bot_for(local)
        assert (await interact(http, local, {"type": "interrupt"})).json()["via"] == "bot"
        assert len(local_bot.sent) == 1
        no_rest = await interact(http, local, {"type": "interrupt"}, via="rest")
        assert no_rest.status_code == 409 and no_rest.json()["error"]["code"] == "rest_unavailable"
        stood = await create(
            http,
            conversation_url="ws://127.0.0.1:9/room-b",
            conversation_id="sim-b",
            interactions_url=standin.url,
        )
        standin.add_conversation(stood)
        via_standin = await interact(http, stood, {"type": "echo", "text": "hi"}, via="rest")
        assert via_standin.status_code == 200 and via_standin.json()["via"] == "rest"
        assert texts(standin, stood) == ["hi"] and sends(fake_tavus, stood) == 0

        bad = await interact(http, local, {"type": "interrupt"}, via="carrier-pigeon")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_via"
        for url in ("http://10.0.0.1:80", "ftp://127.0.0.1/", "https://example.com"):
            refused = await http.post(
                "/api/conversations",
                json={
                    "persona": "echo",
                    "conversation_url": "ws://127.0.0.1:9/r",
                    "interactions_url": url,
                },
                headers=AUTH,
            )
            assert refused.status_code == 400, url
            assert refused.json()["error"]["param"] == "interactions_url"
    async with httpx.AsyncClient(base_url=bots.url, timeout=15) as http:
        cid = await create(http)
        await bot_for(cid)
        assert (await interact(http, cid, {"type": "interrupt"})).json()["via"] == "bot"
        assert sends(fake_tavus, cid) == 0


async def test_auto_falls_back_when_the_first_path_surely_did_not_deliver(
    app_server: ServerFactory, fake_tavus: FakeTavus, standin: FakeTavus
) -> None:
    server = app_server(interaction_budget=10)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http)
        bot = await bot_for(cid)
        # REST: 502 on every attempt ("could not be delivered") → the bot in the room.
        fake_tavus.fail_app_messages("not_delivered", count=4)
        resp = await interact(http, cid, {"type": "echo", "text": "through the bot"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["via"] == "bot" and resp.json()["fallback_from"] == "rest"
        assert sends(fake_tavus, cid) == 4 and texts(fake_tavus, cid) == []
        assert len(bot.sent) == 1
        failed = [e for e in await events(http, cid) if e["kind"] == "interaction.error"]
        assert failed and failed[0]["payload"]["code"] == "tavus_not_delivered"
        assert failed[0]["payload"]["http_status"] == 502

        # ...and the other way: a local room whose bot cannot send → the stand-in's API.
        local = await create(
            http,
            conversation_url="ws://127.0.0.1:9/room-c",
            conversation_id="sim-c",
            interactions_url=standin.url,
        )
        standin.add_conversation(local)
        local_bot = await bot_for(local)
        local_bot.fail_sends = True
        resp = await interact(http, local, {"type": "echo", "text": "through REST"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["via"] == "rest" and resp.json()["fallback_from"] == "bot"
        assert texts(standin, local) == ["through REST"]

    # Connection refused (Tavus unreachable) is surely not delivered too.
    down = app_server(tavus_api_url=f"http://127.0.0.1:{free_port()}", interaction_budget=2)
    async with httpx.AsyncClient(base_url=down.url, timeout=15) as http:
        cid = await create(http, conversation_url="https://tavus.daily.co/c-down")
        bot = await bot_for(cid)
        resp = await interact(http, cid, {"type": "interrupt"})
        assert resp.status_code == 200 and resp.json()["via"] == "bot"
        assert resp.json()["fallback_from"] == "rest" and len(bot.sent) == 1


async def test_no_fallback_when_it_may_have_been_delivered(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    """504 "may have been delivered": 202 `uncertain`, recorded, sent once, and neither retried
    nor sent through the bot."""
    server = app_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http)
        bot = await bot_for(cid)
        fake_tavus.fail_app_messages("maybe_delivered", deliver=True)
        resp = await interact(http, cid, {"type": "echo", "text": "maybe"}, key="maybe-1")
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert body["delivery"] == "uncertain" and body["delivered"] is None
        assert body["via"] == "rest" and body["tavus"]["error"].startswith("The app message may")
        assert sends(fake_tavus, cid) == 1 and bot.sent == []
        [stored] = [e for e in await events(http, cid) if e["kind"].startswith("interaction.")]
        assert stored["payload"]["delivery"]["status"] == "uncertain"
        assert stored["payload"]["delivery"]["http_status"] == 504
        # The caller's retry with the same key is answered from the record: not sent again.
        again = await interact(http, cid, {"type": "echo", "text": "maybe"}, key="maybe-1")
        assert again.status_code == 202 and again.json()["replayed"] is True
        assert sends(fake_tavus, cid) == 1 and bot.sent == []


async def test_429_and_502_are_retried_within_the_budget(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    server = app_server(interaction_budget=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http, bot=False)
        fake_tavus.fail_app_messages("rate_limited", count=2, retry_after=0.3)
        started = time.monotonic()
        resp = await interact(http, cid, {"type": "echo", "text": "after waiting"})
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - started >= 0.6 and resp.json()["attempts"] == 3

        fake_tavus.fail_app_messages("not_delivered", count=2)
        resp = await interact(http, cid, {"type": "echo", "text": "after retrying"})
        assert resp.status_code == 200 and resp.json()["attempts"] == 3
        assert texts(fake_tavus, cid) == ["after waiting", "after retrying"]

        # Past the budget: a 429 is passed on with Tavus's Retry-After, sent once.
        before = sends(fake_tavus, cid)
        fake_tavus.fail_app_messages("rate_limited", retry_after=30)
        limited = await interact(http, cid, {"type": "interrupt"})
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"]["code"] == "tavus_rate_limited"
        assert limited.headers["retry-after"] == "30"
        assert sends(fake_tavus, cid) == before + 1

        fake_tavus.fail_app_messages("not_delivered", count=20)
        failed = await interact(http, cid, {"type": "interrupt"})
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "tavus_not_delivered"
        assert "retry-after" in failed.headers
        assert 2 <= sends(fake_tavus, cid) - (before + 1) <= 4  # bounded by attempts and budget
        fake_tavus._app_failures.clear()


async def test_ended_or_roomless_conversation_is_409(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    server = app_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        gone = await create(http, bot=False)
        fake_tavus.room_gone(gone)
        resp = await interact(http, gone, {"type": "interrupt"})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "conversation_ended"
        assert "no longer available" in resp.json()["error"]["message"]

        inactive = await create(http)
        await bot_for(inactive)
        fake_tavus.conversations[inactive]["status"] = "ended"
        resp = await interact(http, inactive, {"type": "interrupt"})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "conversation_ended"
        assert BOTS[inactive][-1].sent == [], "an ended conversation is not tried on the bot"


async def test_over_the_path_limit_is_413_before_anything_is_sent(
    app_server: ServerFactory, fake_tavus: FakeTavus, standin: FakeTavus
) -> None:
    server = app_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http)
        bot = await bot_for(cid)
        huge = {"type": "append_context", "context": "x" * 70_000}  # > 65,536 bytes
        resp = await interact(http, cid, huge)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "interaction_too_large"
        assert sends(fake_tavus, cid) == 0 and bot.sent == []
        # 5,000 bytes: fine for Tavus's API, too big for a Daily app-message.
        mid = {"type": "append_context", "context": "y" * 5000}
        too_big_for_bot = await interact(http, cid, mid, via="bot")
        assert too_big_for_bot.status_code == 413 and bot.sent == []
        assert "4,096" in too_big_for_bot.json()["error"]["message"]
        assert (await interact(http, cid, mid)).json()["via"] == "rest"
        # A local room whose path would be the bot takes the stand-in's API when it fits.
        local = await create(
            http,
            conversation_url="ws://127.0.0.1:9/room-d",
            conversation_id="sim-d",
            interactions_url=standin.url,
        )
        standin.add_conversation(local)
        await bot_for(local)
        assert (await interact(http, local, mid)).json()["via"] == "rest"


async def test_idempotency_key_is_sent_once_whatever_the_path(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    server = app_server(interaction_budget=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http)
        bot = await bot_for(cid)
        first = await interact(http, cid, {"type": "echo", "text": "once"}, key="k-1")
        again = await interact(http, cid, {"type": "echo", "text": "once"}, key="k-1")
        assert first.status_code == again.status_code == 200
        assert again.json()["replayed"] is True and again.json()["via"] == "rest"
        assert again.json()["message"] == first.json()["message"]
        assert sends(fake_tavus, cid) == 1

        # REST fails surely → the bot delivers; the retry must not go out over REST now.
        fake_tavus.fail_app_messages("not_delivered", count=4)
        fell = await interact(http, cid, {"type": "echo", "text": "fell back"}, key="k-2")
        assert fell.json()["via"] == "bot"
        retry = await interact(http, cid, {"type": "echo", "text": "fell back"}, key="k-2")
        assert retry.status_code == 200 and retry.json()["replayed"] is True
        assert retry.json()["via"] == "bot"
        assert texts(fake_tavus, cid) == ["once"] and len(bot.sent) == 1

        # Concurrent retries of one key: one send.
        results = await asyncio.gather(
            *(interact(http, cid, {"type": "echo", "text": "racing"}, key="k-3") for _ in range(5))
        )
        assert all(r.status_code == 200 for r in results)
        assert texts(fake_tavus, cid) == ["once", "racing"]
        assert sum(r.json()["replayed"] for r in results) == 4


async def test_interactions_leave_in_the_order_accepted(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    """The first interaction is refused once with a 502 and retried after a backoff; the
    second, accepted meanwhile, waits its turn instead of overtaking it."""
    server = app_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http, bot=False)
        fake_tavus.app_message_delay = 0.05
        fake_tavus.fail_app_messages("not_delivered", count=2)
        first = asyncio.create_task(interact(http, cid, {"type": "echo", "text": "first"}))
        await eventually(lambda: _true(sends(fake_tavus, cid) >= 1))
        rest = []
        for text in ("second", "third", "fourth"):
            rest.append(asyncio.create_task(interact(http, cid, {"type": "echo", "text": text})))
            await asyncio.sleep(0.02)
        for response in await asyncio.gather(first, *rest):
            assert response.status_code == 200, response.text
        assert texts(fake_tavus, cid) == ["first", "second", "third", "fourth"]
        spans = [(start, end) for c, _, start, end in fake_tavus.app_message_spans if c == cid]
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


async def _true(value: bool) -> bool:
    return value


async def test_tavus_rate_limit_is_kept_per_key(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    """Three conversations at once, one key: never more than the burst, then `rate` a second."""
    server = app_server(tavus_rate_limit_rps=5, tavus_rate_limit_burst=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cids = [await create(http, bot=False) for _ in range(3)]
        fake_tavus.app_message_spans.clear()
        results = await asyncio.gather(
            *(
                interact(http, cid, {"type": "echo", "text": str(i)})
                for cid in cids
                for i in range(3)
            )
        )
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert_within_limit([start for _, _, start, _ in fake_tavus.app_message_spans], 5, 2)


def assert_within_limit(starts: list[float], rate: float, burst: int) -> None:
    """A token bucket's promise: the n-th request (from 0) comes no earlier than
    (n - burst + 1) / rate seconds after the first."""
    starts = sorted(starts)
    for n, at in enumerate(starts):
        earliest = max(0.0, (n - burst + 1) / rate)
        assert at - starts[0] >= earliest - 0.03, (n, at - starts[0], earliest)


async def test_ready_video_is_announced_over_rest(
    app_server: ServerFactory, fake_tavus: FakeTavus, tmp_path: Path
) -> None:
    """The videos announcer goes through the same delivery: a conversation without a bot
    still hears that its video is ready."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'videos.db'}"
    server = app_server(database_url=url)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = await create(http, bot=False)
        store = await open_store(url)
        try:
            await store.upsert_video(
                VideoRecord(
                    "tavus",
                    "vid-rest",
                    "rendering",
                    conversation_id=cid,
                    raw={"_cvi": {"on_ready": "echo", "ready_text": "Your recap is ready."}},
                )
            )
        finally:
            await store.aclose()
        resp = await http.post(
            "/callbacks/tavus",
            params={"token": CALLBACK_TOKEN},
            json={"video_id": "vid-rest", "status": "ready", "download_url": "https://v/1.mp4"},
        )
        assert resp.status_code == 200, resp.text
        await eventually(lambda: _true(texts(fake_tavus, cid) == ["Your recap is ready."]))


# -- across processes, through Redis --------------------------------------------------------------


@pytest.fixture
async def redis_client() -> Any:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        pytest.fail(f"Redis is required at {REDIS_TEST_URL} ({exc}); start it, see README")
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_order_is_kept_across_two_services(
    app_server: ServerFactory, fake_tavus: FakeTavus, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Two web processes (two services on one Redis): an interaction posted to B while A's
    is still being retried leaves after it."""
    shared = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
        "redis_url": REDIS_TEST_URL,
        "run_worker": False,
    }
    a = app_server(**shared)
    b = app_server(**shared)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=15) as http_b,
    ):
        cid = await create(http_a, bot=False)
        fake_tavus.app_message_delay = 0.05
        fake_tavus.fail_app_messages("not_delivered", count=2)
        first = asyncio.create_task(interact(http_a, cid, {"type": "echo", "text": "A first"}))
        await eventually(lambda: _true(sends(fake_tavus, cid) >= 1))
        second = asyncio.create_task(interact(http_b, cid, {"type": "echo", "text": "B second"}))

        async def both_queued() -> bool:  # B's ticket is behind A's: B counts as accepted
            return int(await redis_client.llen("cvi:iturn:" + cid)) >= 2

        await eventually(both_queued)
        third = asyncio.create_task(interact(http_a, cid, {"type": "echo", "text": "A third"}))
        for response in await asyncio.gather(first, second, third):
            assert response.status_code == 200, response.text
    assert texts(fake_tavus, cid) == ["A first", "B second", "A third"]
    spans = [(s, e) for c, _, s, e in fake_tavus.app_message_spans if c == cid]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@pytest.mark.redis
async def test_rate_limit_is_shared_across_two_services(
    app_server: ServerFactory, fake_tavus: FakeTavus, redis_client: redis.Redis, tmp_path: Path
) -> None:
    await redis_client.delete("cvi:tavus-rate:" + key_id(TAVUS_KEY))  # a fresh bucket
    shared = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
        "redis_url": REDIS_TEST_URL,
        "run_worker": False,
        "tavus_rate_limit_rps": 5,
        "tavus_rate_limit_burst": 2,
    }
    a = app_server(**shared)
    b = app_server(**shared)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=15) as http_b,
    ):
        cids = [await create(http_a, bot=False) for _ in range(4)]
        fake_tavus.app_message_spans.clear()
        results = await asyncio.gather(
            *(
                interact(http, cid, {"type": "interrupt"})
                for cid in cids
                for http in (http_a, http_b)
            )
        )
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert_within_limit([s for _, _, s, _ in fake_tavus.app_message_spans], 5, 2)


@pytest.mark.redis
async def test_redis_turns_survive_a_dead_holder_and_time_out(redis_client: redis.Redis) -> None:
    """A ticket whose process died (its heartbeat key gone) is dropped once it expires; a
    waiter that gives up leaves the queue."""
    turns_a = RedisTurns(redis_client, ticket_ttl=0.5)
    other = redis.Redis.from_url(REDIS_TEST_URL)
    turns_b = RedisTurns(other, ticket_ttl=0.5)
    cid = f"turns-{time.monotonic_ns()}"
    order: list[str] = []
    try:
        # A "dead" holder: a ticket at the head whose heartbeat will never be renewed.
        await redis_client.set(f"cvi:iturn:{cid}:ghost", "1", px=300)
        await redis_client.rpush(f"cvi:iturn:{cid}", "ghost")
        started = time.monotonic()
        async with turns_a.turn(cid, 5):
            order.append("a")
        assert 0.2 < time.monotonic() - started < 2.0

        async def hold(turns: RedisTurns, name: str, seconds: float) -> None:
            async with turns.turn(cid, 5):
                order.append(name)
                await asyncio.sleep(seconds)

        holder = asyncio.create_task(hold(turns_a, "b", 0.5))
        await asyncio.sleep(0.05)
        with pytest.raises(TurnTimeout):
            async with turns_b.turn(cid, 0.1):
                order.append("never")
        waiter = asyncio.create_task(hold(turns_b, "c", 0))
        await asyncio.gather(holder, waiter)
        assert order == ["a", "b", "c"]
        assert await redis_client.llen(f"cvi:iturn:{cid}") == 0
    finally:
        await other.aclose()
