"""The SQL store on SQLite and the real PostgreSQL: idempotency, merging, ordering, migrations."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from cvi_agent.store import (
    EventRecord,
    SqlStore,
    ToolCallRecord,
    UtteranceRecord,
    VideoRecord,
    open_store,
)


def event(key: str, seq: int | None = None, conv: str = "c1", kind: str = "x") -> EventRecord:
    return EventRecord(
        conversation_id=conv, source="room", kind=kind, dedupe_key=key, payload={"k": key}, seq=seq
    )


async def test_duplicate_deliveries_stored_once(store: SqlStore) -> None:
    first = await store.add_events([event("a", 1), event("b", 2)])
    assert [e.dedupe_key for e in first] == ["a", "b"]
    again = await store.add_events([event("a", 1), event("c", 3), event("b", 2)])
    assert [e.dedupe_key for e in again] == ["c"]
    assert await store.count_events("c1") == 3
    # the same key from another source is another delivery
    other = EventRecord(
        conversation_id="c1", source="callback", kind="x", dedupe_key="a", payload={}
    )
    assert await store.add_event(other)
    assert await store.count_events("c1") == 4


async def test_a_large_batch_is_stored_once_and_answered_in_order(
    store: SqlStore,
) -> None:
    # 131 records (one statement padded to 256 rows): some stored before, some repeated in it.
    stored = await store.add_events([event(f"k{i}", i) for i in range(0, 130, 13)])
    assert len(stored) == 10
    batch = [event(f"k{i}", i) for i in range(126)] + [event(f"k{i}", i) for i in (3, 70, 125)]
    batch += [event(f"k{i}", i) for i in range(126, 128)]
    new = await store.add_events(batch)
    expected = [f"k{i}" for i in range(128) if i % 13]
    assert [e.dedupe_key for e in new] == expected
    assert all(e.id is not None for e in new)
    assert len({e.id for e in new} | {e.id for e in stored}) == 128
    assert await store.count_events("c1") == 128
    listed = await store.list_events("c1", order="id")
    assert {e.id: e.dedupe_key for e in listed} == {e.id: e.dedupe_key for e in [*stored, *new]}


async def test_events_read_back_in_seq_order(store: SqlStore) -> None:
    for seq in (5, 3, 4, 1, 2):
        rec = event(f"k{seq}", seq)
        rec.occurred_at = 1000.0 + seq
        await store.add_event(rec)
    seqs = [e.seq for e in await store.list_events("c1")]
    assert seqs == [1, 2, 3, 4, 5]
    assert (await store.list_events("c1"))[0].payload == {"k": "k1"}


async def test_utterance_halves_merge_in_any_order(store: SqlStore) -> None:
    spoken = UtteranceRecord(
        "c1", "replica", "inf1", spoken_text="It's sixty", is_interrupted=True, seq=57
    )
    intended = UtteranceRecord(
        "c1", "replica", "inf1", intended_text="It's sixty-eight degrees.", seq=50
    )
    await store.upsert_utterances([spoken])
    await store.upsert_utterances([intended])
    [u] = await store.list_utterances("c1")
    assert u.text == "It's sixty" and u.intended_text == "It's sixty-eight degrees."
    assert u.is_interrupted is True and u.seq == 57


async def test_tool_call_result_updates(store: SqlStore) -> None:
    call = ToolCallRecord("c1", "call_1", "get_current_weather", '{"location": "SF"}', "call_1")
    await store.upsert_tool_call(call)
    await store.upsert_tool_call(call)
    done = ToolCallRecord(
        "c1", "call_1", "get_current_weather", "{}", "call_1", status="success", output="68F"
    )
    await store.upsert_tool_call(done)
    [row] = await store.list_tool_calls("c1")
    assert row.status == "success" and row.output == "68F" and row.arguments == '{"location": "SF"}'


async def test_video_status_never_regresses(store: SqlStore) -> None:
    await store.upsert_video(VideoRecord("argil", "v1", "rendering", conversation_id="c1"))
    await store.upsert_video(VideoRecord("argil", "v1", "ready", url="https://x/v.mp4"))
    late = await store.upsert_video(VideoRecord("argil", "v1", "queued"))
    assert late.status == "ready"
    row = await store.get_video("argil", "v1")
    assert row is not None and row.status == "ready" and row.url == "https://x/v.mp4"
    assert row.conversation_id == "c1"
    assert [v.video_id for v in await store.list_videos("c1")] == ["v1"]


async def test_conversations_transcripts_answers(store: SqlStore) -> None:
    await store.upsert_conversation("c1", persona="echo", meta={"a": 1})
    await store.upsert_conversation("c1", status="ended", meta={"b": 2})
    conv = await store.get_conversation("c1")
    assert conv is not None and conv.status == "ended" and conv.persona == "echo"
    assert conv.meta == {"a": 1, "b": 2}
    await store.set_transcript("c1", [{"role": "user", "content": "hi"}])
    await store.set_transcript("c1", [{"role": "user", "content": "hello"}])
    assert await store.get_transcript("c1") == [{"role": "user", "content": "hello"}]
    await store.set_answers("c1", {"name": "Maya", "role": "engineer"})
    await store.set_answers("c1", {"name": "Maya B."})
    assert await store.get_answers("c1") == {"name": "Maya B.", "role": "engineer"}
    assert [c.id for c in await store.list_conversations()] == ["c1"]


async def test_last_event_times(store: SqlStore) -> None:
    """When each conversation last heard anything: what the console's sidebar tells a live
    conversation from a forgotten one by."""
    await store.upsert_conversation("quiet", persona="echo")
    records = [
        EventRecord("busy", "llm", "llm.turn", f"k{i}", {}, received_at=1000.0 + i)
        for i in range(3)
    ]
    records.append(EventRecord("other", "room", "x", "k9", {}, received_at=50.0))
    await store.add_events(records)
    times = await store.last_event_times(["busy", "quiet", "other", "absent"])
    assert times == {"busy": 1002.0, "other": 50.0}
    assert await store.last_event_times([]) == {}


async def test_migrations_idempotent(store: SqlStore) -> None:
    version = await store.schema_version()
    assert version >= 1
    await store.init()
    assert await store.schema_version() == version


def _open_after(url: str, barrier: Any) -> None:
    """One process of the start-up race: wait for the others, then migrate."""

    async def main() -> None:
        barrier.wait(timeout=30)
        store = await open_store(url)
        await store.aclose()

    asyncio.run(main())


@pytest.mark.process
def test_processes_starting_at_once_on_a_fresh_sqlite_file_all_start(tmp_path: Path) -> None:
    """`serve --workers N` (or a server and a worker) on a database file nobody created yet:
    every process migrates at once; none may fail with "table already exists"."""
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        url = f"sqlite+aiosqlite:///{tmp_path / f'fresh-{attempt}.db'}"
        barrier = context.Barrier(4)
        processes = [context.Process(target=_open_after, args=(url, barrier)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [p.exitcode for p in processes] == [0, 0, 0, 0], f"attempt {attempt}"


async def test_new_conversation_with_status(store: SqlStore) -> None:
    await store.upsert_conversation("c9", status="live", persona="echo")
    conv = await store.get_conversation("c9")
    assert conv is not None and conv.status == "live"
