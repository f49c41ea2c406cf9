"""Faults in the room: a dropped connection is rejoined by the bot itself, and what the replica
sent while the bot was away shows up as a gap in its `seq` numbers (`bot.seq_gap`), on SQLite
and the real PostgreSQL, with a real LocalRoomServer and a scripted replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cvi_agent.bot.seqgaps import SeqGap, SeqGaps
from cvi_agent.bot.session import ConversationBot
from cvi_agent.devtools.fakes.replica import ScriptedPeer
from cvi_agent.personas import load_persona
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.store import EventRecord, SqlStore
from tests.support import PERSONAS

CID = "conv-faults-room"
CONCIERGE = load_persona(PERSONAS / "concierge.yaml")

# -- the detector alone ------------------------------------------------------------------------------


def detector(window: float = 0.2, **kw: Any) -> tuple[SeqGaps, list[SeqGap]]:
    found: list[SeqGap] = []
    return SeqGaps(found.append, window=window, **kw), found


async def test_in_order_and_reordered_within_the_window_is_no_gap() -> None:
    gaps, found = detector()
    for seq in (10, 11, 13, 12, 15, 14, 16, 11, 16):  # reordered, duplicated
        gaps.see(seq)
    await asyncio.sleep(0.35)
    assert found == [] and gaps.high == 16 and gaps.late == 0


async def test_a_hole_that_stays_open_is_reported_once_after_the_window() -> None:
    gaps, found = detector()
    for seq in (1, 2, 3, 7, 8, 10):
        gaps.see(seq)
    await asyncio.sleep(0.1)
    assert found == [], "not before the window"
    await asyncio.sleep(0.25)
    assert found == [SeqGap(3, 7), SeqGap(8, 10)]
    assert [g.as_dict() for g in found] == [
        {"after": 3, "before": 7, "missing": 3},
        {"after": 8, "before": 10, "missing": 1},
    ]
    assert gaps.high == 10 and gaps.missing == 4
    gaps.see(5)  # arrives after all: stored by the bot, counted as late, not reported again
    gaps.see(11)
    await asyncio.sleep(0.3)
    assert len(found) == 2 and gaps.late == 1 and gaps.high == 11


async def test_a_newer_hole_waits_its_own_window() -> None:
    gaps, found = detector(window=0.3)
    gaps.see(1)
    gaps.see(3)  # hole at 2
    await asyncio.sleep(0.2)
    gaps.see(6)  # hole at 4..5, opened later
    await asyncio.sleep(0.15)
    assert found == [SeqGap(1, 3)], "only the hole that was open for the whole window"
    gaps.see(5)
    gaps.see(4)  # the second hole fills in time
    await asyncio.sleep(0.35)
    assert found == [SeqGap(1, 3)] and gaps.high == 6


async def test_too_many_held_events_and_stopping_report_at_once() -> None:
    gaps, found = detector(window=60, max_held=5)
    gaps.see(1)
    for seq in range(3, 9):  # 6 events wait above the hole at 2
        gaps.see(seq)
    assert found == [SeqGap(1, 3)] and gaps.high == 8
    gaps.see(20)
    gaps.flush()  # the bot stops: what is still open is lost
    assert found == [SeqGap(1, 3), SeqGap(8, 20)]
    gaps.start_after(100)  # a baseline only counts before the first event
    assert gaps.high == 20


# -- a bot in a real room ------------------------------------------------------------------------------


@dataclass
class Scene:
    bot: ConversationBot
    replica: ScriptedPeer
    human: ScriptedPeer
    runner: asyncio.Task[str]
    feed: list[EventRecord] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [r.kind for r in self.feed]

    async def until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {within}s; feed: {self.kinds()}")
            if self.runner.done():
                raise AssertionError(f"the bot ended: {self.runner.result()}")
            await asyncio.sleep(0.02)

    def room_seqs(self) -> list[int]:
        return sorted(r.seq for r in self.feed if r.source == "room" and r.seq is not None)

    async def close(self) -> None:
        await self.bot.stop("test over")
        await asyncio.wait_for(self.runner, 10)
        await self.human.leave()
        await self.replica.leave()


@pytest.fixture
async def rooms() -> AsyncIterator[LocalRoomServer]:
    async with LocalRoomServer() as srv:
        yield srv


async def open_scene(
    rooms: LocalRoomServer, store: SqlStore, name: str = "faults", gap_window: float = 0.3
) -> Scene:
    url = rooms.room_url(name)
    replica = await ScriptedPeer(
        url, conversation_id=CID, user_name=CONCIERGE.persona_name, user_id="tavus-replica-1"
    ).join()
    replica.room.backoff_initial = 0.05
    human = await ScriptedPeer(url, user_name="Alice", user_id="user-alice").join()
    human.room.backoff_initial = 0.05
    feed: list[EventRecord] = []

    async def on_record(record: EventRecord) -> None:
        feed.append(record)

    bot = ConversationBot(
        LocalRoom(backoff_initial=0.05, backoff_max=0.2, reconnect_timeout=20),
        conversation_id=CID,
        store=store,
        persona=CONCIERGE,
        on_record=on_record,
        gap_window=gap_window,
    )
    await bot.start(url)
    await replica.wait_until(lambda: len(replica.inbox.joined) == 2)  # human + bot
    return Scene(bot, replica, human, asyncio.create_task(bot.run()), feed)


async def say(replica: ScriptedPeer, n: int) -> None:
    for _ in range(n):
        await replica.say(
            "conversation.utterance",
            {"role": "user", "speech": f"line {replica.seq + 1}"},
            inference_id=f"i{replica.seq + 1}",
        )


async def test_a_dropped_bot_rejoins_and_records_the_gap(
    rooms: LocalRoomServer, store: SqlStore
) -> None:
    """The bot's connection is cut and its rejoin refused for a while; the replica goes on
    talking meanwhile. The bot rejoins by itself, the five events it could not hear are one
    recorded gap, and everything after the rejoin is recorded again."""
    async with asyncio.timeout(60):
        scene = await open_scene(rooms, store)
        r = scene.replica
        await say(r, 5)
        await scene.until(lambda: scene.room_seqs() == [1, 2, 3, 4, 5])

        local = scene.bot.room.local_participant
        assert local is not None
        dropped = await rooms.drop_connections(participants={local.id}, refuse_for=1.0)
        assert dropped == 1
        await r.wait_until(lambda: any(p.user_name == "cvi-agent" for p in r.inbox.left))
        assert scene.bot.room.state == "reconnecting"
        await say(r, 5)  # seq 6..10: nobody relays them to the bot
        await scene.until(lambda: "bot.reconnected" in scene.kinds(), 15)
        assert str(scene.bot.room.state) == "joined"
        await say(r, 5)  # seq 11..15
        await scene.until(lambda: "bot.seq_gap" in scene.kinds())
        await scene.until(lambda: scene.room_seqs()[-1:] == [15])

        gaps = [e for e in scene.feed if e.kind == "bot.seq_gap"]
        assert [g.payload for g in gaps] == [{"after": 5, "before": 11, "missing": 5}]
        assert scene.room_seqs() == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]
        kinds = scene.kinds()
        assert kinds.index("bot.disconnected") < kinds.index("bot.reconnected")
        assert [e.payload["permanent"] for e in scene.feed if e.kind == "bot.disconnected"] == [
            False
        ]

        # The bot still works both ways after the rejoin.
        await scene.bot.echo("Still here.")
        await r.wait_for(lambda m: m.get("properties", {}).get("text") == "Still here.")
        await scene.close()
        assert scene.runner.result() == "test over"
        assert scene.bot.stats.seq_gaps == 1 and scene.bot.stats.seq_missing == 5

    stored = await store.list_events(CID, order="id")
    assert [e.payload for e in stored if e.kind == "bot.seq_gap"] == [
        {"after": 5, "before": 11, "missing": 5}
    ]
    seqs = [e.seq for e in stored if e.source == "room" and e.seq is not None]
    assert sorted(seqs) == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15] and len(set(seqs)) == len(seqs)
    utterances = [u.text for u in await store.list_utterances(CID)]
    assert utterances == [f"line {n}" for n in (1, 2, 3, 4, 5, 11, 12, 13, 14, 15)]
    left = next(e for e in stored if e.kind == "bot.left")
    assert left.payload["stats"]["seq_gaps"] == 1 and left.payload["stats"]["seq_missing"] == 5


async def test_everyone_dropped_every_seq_is_recorded_or_reported(
    rooms: LocalRoomServer, store: SqlStore
) -> None:
    """The whole room drops (the room server's network blips). The replica's sends wait in its
    own queue and go out when it is back, which may be before or after the bot is back: each of
    those events is either recorded or inside a reported gap, never both, never neither."""
    async with asyncio.timeout(60):
        scene = await open_scene(rooms, store, name="blip")
        r = scene.replica
        await say(r, 3)
        await scene.until(lambda: scene.room_seqs() == [1, 2, 3])
        assert await rooms.drop_connections() == 3
        await say(r, 3)  # 4..6, queued by the replica's room until it is back
        await scene.until(lambda: "bot.reconnected" in scene.kinds(), 15)
        await say(r, 2)  # 7, 8
        await scene.until(lambda: scene.room_seqs()[-1:] == [8], 15)
        await asyncio.sleep(0.6)  # longer than the gap window
        await scene.close()
        missing = [
            seq
            for e in scene.feed
            if e.kind == "bot.seq_gap"
            for seq in range(e.payload["after"] + 1, e.payload["before"])
        ]
        recorded = scene.room_seqs()
        assert sorted(recorded + missing) == list(range(1, 9)), (recorded, missing)
        assert recorded[:3] == [1, 2, 3] and recorded[-2:] == [7, 8]


async def test_out_of_order_delivery_is_not_a_gap(rooms: LocalRoomServer, store: SqlStore) -> None:
    async with asyncio.timeout(30):
        scene = await open_scene(rooms, store, name="reorder")
        r = scene.replica
        messages = [
            r.event("conversation.utterance", {"role": "user", "speech": f"x{n}"}, seq=n)
            for n in range(1, 8)
        ]
        for n in (1, 2, 4, 3, 6, 7, 5):
            await r.send(messages[n - 1])
            await asyncio.sleep(0.05)
        await scene.until(lambda: scene.room_seqs() == list(range(1, 8)))
        await asyncio.sleep(0.5)
        assert "bot.seq_gap" not in scene.kinds()
        await scene.close()


async def test_a_new_bot_continues_from_the_stored_seq(
    rooms: LocalRoomServer, store: SqlStore
) -> None:
    """A bot that takes a conversation over (another worker died) starts from the highest `seq`
    already stored: what was said while no bot was in the room is a recorded gap."""
    async with asyncio.timeout(30):
        first = await open_scene(rooms, store, name="handover")
        await say(first.replica, 4)
        await first.until(lambda: first.room_seqs() == [1, 2, 3, 4])
        await first.bot.stop("worker died")
        await asyncio.wait_for(first.runner, 10)
        await say(first.replica, 3)  # 5..7: no bot in the room
        await first.human.leave()
        await first.replica.leave()

        second = await open_scene(rooms, store, name="handover")
        second.replica.seq = first.replica.seq
        await say(second.replica, 2)  # 8, 9
        await second.until(lambda: "bot.seq_gap" in second.kinds())
        gap = next(e for e in second.feed if e.kind == "bot.seq_gap")
        assert gap.payload == {"after": 4, "before": 8, "missing": 3}
        await second.close()
