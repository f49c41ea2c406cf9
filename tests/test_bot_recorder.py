"""The recorder against the real PostgreSQL: an outage is waited out, a rejected record is
isolated, and closing never hangs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from cvi_agent.bot.recorder import Pending, Recorder, order_by_seq
from cvi_agent.store import EventRecord, UtteranceRecord, open_store
from cvi_agent.store.base import MAX_JSON_DEPTH
from tests.support import API_KEY, PG_ADMIN_URL, ServerFactory


def event(n: int, seq: int | None = None, payload: dict[str, object] | None = None) -> EventRecord:
    return EventRecord(
        conversation_id="c",
        source="room",
        kind="k",
        dedupe_key=f"c:k:{n}",
        payload=payload if payload is not None else {"n": n},
        seq=seq,
    )


async def set_connections(database: str, allowed: bool) -> None:
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await admin.execute(
            f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {"true" if allowed else "false"}'
        )
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
    finally:
        await admin.close()


def test_order_by_seq_moves_only_sequenced_records() -> None:
    items = [Pending(event(i, seq)) for i, seq in enumerate([5, None, 3, 4, None, 1])]
    assert [p.event.seq for p in order_by_seq(items)] == [1, None, 3, 4, None, 5]


@pytest.mark.postgres
async def test_outage_is_waited_out_and_nothing_is_lost(pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    store = await open_store(pg_url)
    seen: list[EventRecord] = []

    async def on_record(record: EventRecord) -> None:
        seen.append(record)

    recorder = Recorder(store, on_record=on_record, retry_max=0.3)
    recorder.start()
    recorder.put(Pending(event(0)))
    await recorder.flush()
    await set_connections(database, False)
    try:
        for n in range(1, 51):
            recorder.put(
                Pending(
                    event(n, seq=n),
                    utterance=UtteranceRecord("c", "user", f"k{n}", intended_text=f"t{n}"),
                )
            )
        await asyncio.sleep(1.0)  # the recorder retries; the room is never blocked meanwhile
        assert recorder.backlog > 0 or recorder.stored == 1
    finally:
        await set_connections(database, True)
    await recorder.close()
    assert await store.count_events("c") == 51
    assert len(await store.list_utterances("c")) == 50
    assert [r.dedupe_key for r in seen] == [f"c:k:{n}" for n in range(51)]
    assert recorder.dropped == 0
    await store.aclose()


@pytest.mark.postgres
async def test_a_record_the_database_rejects_is_isolated(pg_url: str) -> None:
    store = await open_store(pg_url)
    recorder = Recorder(store)
    recorder.start()
    recorder.put(Pending(event(1)))
    recorder.put(Pending(event(2, payload={"text": "nul\u0000inside", "set": {1, 2}})))
    recorder.put(Pending(event(3)))
    too_long = event(4)
    too_long.kind = "k" * 300  # longer than the column: rejected even after scrubbing
    recorder.put(Pending(too_long))
    recorder.put(Pending(event(5)))
    await recorder.close()
    stored = {e.dedupe_key: e for e in await store.list_events("c")}
    assert sorted(stored) == ["c:k:1", "c:k:2", "c:k:3", "c:k:5"]
    assert stored["c:k:2"].payload["text"] == "nulinside"
    assert recorder.dropped == 1
    await store.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize(("close_timeout", "within"), [(0.5, 3.0), (0.0, 1.0)])
async def test_close_gives_up_when_the_database_stays_away(
    pg_url: str, close_timeout: float, within: float
) -> None:
    # close_timeout 0: no patience at all (the loop-time accounting counts nothing, waits nothing).
    database = pg_url.rsplit("/", 1)[1]
    store = await open_store(pg_url)
    recorder = Recorder(store, close_timeout=close_timeout, retry_max=0.2)
    recorder.start()
    await set_connections(database, False)
    try:
        for n in range(20):
            recorder.put(Pending(event(n)))
        started = time.monotonic()
        await asyncio.wait_for(recorder.close(), 10)
        assert time.monotonic() - started < within
        assert recorder.dropped == 20
    finally:
        await set_connections(database, True)
    await store.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize("linger", [0.0, 0.02])
async def test_flush_waits_for_everything_put_before_it(pg_url: str, linger: float) -> None:
    store = await open_store(pg_url)
    recorder = Recorder(store, linger=linger, max_batch=7)
    recorder.start()
    for n in range(100):
        recorder.put(Pending(event(n)))
    await recorder.flush()
    assert await store.count_events("c") == 100
    await recorder.close()
    await store.aclose()


async def test_a_deeply_nested_room_event_is_stored_so_it_reads_back(
    serve: ServerFactory, database_url: str
) -> None:
    """A room message is parsed by the room, not by our body parser: however deep it nests, what
    the recorder stores must still read back through the API (today's bound: pydantic's
    serializer gives up near 255 levels, and the conversation then answered 500 forever)."""
    token = "cb-token-recorder-0123456789"
    server = serve(database_url=database_url, callback_token=token, run_worker=False)
    cid = "c-deep-room"
    deep: Any = "bottom"
    for _ in range(600):
        deep = {"d": deep}
    async with httpx.AsyncClient(base_url=server.url, headers={"x-api-key": API_KEY}) as http:
        joined = {"event_type": "system.replica_joined", "conversation_id": cid}
        resp = await http.post(f"/callbacks/tavus?token={token}", json=joined)
        assert resp.status_code == 200, resp.text
        store = await open_store(database_url)
        recorder = Recorder(store)
        recorder.start()
        try:
            record = EventRecord(
                conversation_id=cid,
                source="room",
                kind="conversation.custom",
                dedupe_key=f"{cid}:deep",
                payload={"message": deep},
            )
            recorder.put(Pending(record))
            await recorder.flush()
        finally:
            await recorder.close()
            await store.aclose()
        got = await http.get(f"/api/conversations/{cid}")
        assert got.status_code == 200, got.text[:300]
        events = await http.get(f"/api/conversations/{cid}/events")
        assert events.status_code == 200, events.text[:300]
        [stored] = [e for e in events.json()["data"] if e["kind"] == "conversation.custom"]
        assert json.dumps(stored["payload"]).count("{") <= MAX_JSON_DEPTH + 1
