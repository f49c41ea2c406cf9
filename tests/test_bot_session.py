"""ConversationBot on a real LocalRoom, with a scripted replica (and humans) speaking the Tavus
event format, recording into the real SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cvi_agent.bot.handlers import demo_weather
from cvi_agent.bot.recorder import Recorder
from cvi_agent.bot.session import ConversationBot
from cvi_agent.devtools.fakes.replica import ScriptedPeer, event_type_is
from cvi_agent.personas import Persona, load_persona
from cvi_agent.rooms.base import RoomClosed
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.store import EventRecord, SqlStore, open_store
from tests.support import PERSONAS

CID = "conv-test-1"
CONCIERGE = load_persona(PERSONAS / "concierge.yaml")


@pytest.fixture
async def server() -> AsyncIterator[LocalRoomServer]:
    async with LocalRoomServer() as srv:
        yield srv


@dataclass
class Scene:
    """A room with a human, the replica and the bot; `feed` is what on_record saw."""

    bot: ConversationBot
    replica: ScriptedPeer
    human: ScriptedPeer
    runner: asyncio.Task[str]
    feed: list[EventRecord] = field(default_factory=list)

    async def finish(self) -> str:
        """The human leaves; the bot leaves after its grace period and returns the reason."""
        await self.human.leave()
        reason = await asyncio.wait_for(self.runner, 10)
        await self.replica.leave()
        return reason


async def open_scene(
    server: LocalRoomServer,
    store: SqlStore,
    persona: Persona | None = CONCIERGE,
    room: str = "conv",
    **bot_options: Any,
) -> Scene:
    url = server.room_url(room)
    name = persona.persona_name if persona else "Replica"
    replica = await ScriptedPeer(
        url, conversation_id=CID, user_name=name, user_id="tavus-replica-1"
    ).join()
    human = await ScriptedPeer(url, user_name="Alice", user_id="user-alice").join()
    feed: list[EventRecord] = []

    async def on_record(record: EventRecord) -> None:
        feed.append(record)

    bot_options.setdefault("leave_grace", 0.2)
    if "recorder" not in bot_options:
        bot_options["on_record"] = on_record
    bot = ConversationBot(
        LocalRoom(), conversation_id=CID, store=store, persona=persona, **bot_options
    )
    await bot.start(url)
    await replica.wait_until(lambda: len(replica.inbox.joined) == 2)  # human + bot
    runner = asyncio.create_task(bot.run())
    return Scene(bot, replica, human, runner, feed)


def exact(message: Any) -> str:
    """A received message as bytes-on-the-wire JSON (key order included)."""
    return json.dumps(message)


async def test_transcript_matches_what_was_said(server: LocalRoomServer, store: SqlStore) -> None:
    scene = await open_scene(server, store)
    r = scene.replica
    await r.say("conversation.user.started_speaking", {}, turn_idx=1)
    await r.say("conversation.started_speaking", {"role": "user"}, turn_idx=1)
    await r.say(
        "conversation.utterance",
        {"role": "user", "speech": "What's the weather?"},
        inference_id="u1",
        turn_idx=1,
    )
    await r.say("conversation.user.stopped_speaking", {}, turn_idx=1)
    await r.say(
        "conversation.stopped_speaking",
        {"role": "user", "interrupted": False, "duration": 1.1},
        turn_idx=1,
    )
    await r.say(
        "conversation.utterance",
        {"role": "replica", "speech": "It's sixty-eight degrees and sunny."},
        inference_id="r1",
        turn_idx=1,
    )
    await r.say("conversation.replica.started_speaking", {}, inference_id="r1")
    await r.say("conversation.started_speaking", {"role": "replica"}, inference_id="r1")
    await r.say(
        "conversation.utterance.streaming",
        {"role": "replica", "speech": "It's sixty", "final": False, "content_index": 0},
        inference_id="r1",
    )
    await r.say(
        "conversation.utterance.streaming",
        {
            "role": "replica",
            "speech": "It's sixty-eight degrees and",
            "final": True,
            "is_interrupted": True,
            "content_index": 0,
        },
        inference_id="r1",
    )
    await r.say("conversation.replica.stopped_speaking", {"interrupted": True}, inference_id="r1")
    await r.say(
        "conversation.stopped_speaking",
        {"role": "replica", "interrupted": True, "duration": 1.42},
        inference_id="r1",
    )
    await r.say(
        "conversation.utterance", {"role": "user", "text": "Thanks!"}, inference_id="u2", turn_idx=2
    )
    await r.say(
        "conversation.utterance",
        {"role": "pal", "speech": "You're welcome."},
        inference_id="r2",
        turn_idx=2,
    )
    await r.say("conversation.started_speaking", {"role": "replica"}, inference_id="r2")
    await r.say(
        "conversation.utterance.streaming",
        {"role": "pal", "speech": "You're welcome.", "final": "true", "is_interrupted": "false"},
        inference_id="r2",
    )
    sent = r.seq

    assert await scene.finish() == "the last human left"
    rows = await store.list_utterances(CID)
    assert [(u.role, u.text, bool(u.is_interrupted)) for u in rows] == [
        ("user", "What's the weather?", False),
        ("replica", "It's sixty-eight degrees and", True),
        ("user", "Thanks!", False),
        ("replica", "You're welcome.", False),
    ]
    assert rows[1].intended_text == "It's sixty-eight degrees and sunny."
    assert rows[1].spoken_text == "It's sixty-eight degrees and"
    room_events = await store.list_events(CID, source="room")
    app_events = [e for e in room_events if e.seq is not None]
    assert [e.seq for e in app_events] == list(range(1, sent + 1))
    assert app_events[2].payload["properties"] == {"role": "user", "speech": "What's the weather?"}
    # Speaking turns count the generic family only, although the legacy twins are stored too.
    assert scene.bot.stats.speaking_turns == {"user": 1, "replica": 2}
    assert scene.bot.stats.interruptions == 1
    assert sum(e.kind == "conversation.replica.started_speaking" for e in room_events) == 1
    # Participants and the bot's own lifecycle are part of the record; on_record saw every row.
    kinds = [e.kind for e in await store.list_events(CID, order="id")]
    assert kinds.count("participant.joined") == 2 and kinds.count("participant.left") == 1
    assert kinds[0] == "participant.joined" or "bot.joined" in kinds
    assert "bot.left" in kinds
    assert len(scene.feed) == await store.count_events(CID)


async def test_interactions_reach_the_peer_byte_exact(
    server: LocalRoomServer, store: SqlStore
) -> None:
    scene = await open_scene(server, store)
    bot, r = scene.bot, scene.replica
    await bot.echo("Hello there!")
    await bot.respond("Tell me a joke")
    await bot.interrupt()
    await bot.overwrite_context("The user is called Alice.")
    await bot.append_context("She likes cats.", job_status="done")
    await bot.sensitivity(pause="low", interrupt="high")
    await bot.tool_result("call_1", {"ok": True})
    await r.wait_until(lambda: len(r.received) == 8)
    expected = [
        {
            "message_type": "conversation",
            "event_type": "conversation.echo",
            "conversation_id": CID,
            "properties": {"modality": "text", "text": "Hello there!"},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.respond",
            "conversation_id": CID,
            "properties": {"text": "Tell me a joke"},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.interrupt",
            "conversation_id": CID,
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.overwrite_llm_context",
            "conversation_id": CID,
            "properties": {"context": "The user is called Alice."},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.append_llm_context",
            "conversation_id": CID,
            "properties": {"context": "She likes cats.", "job_status": "done"},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.sensitivity",
            "conversation_id": CID,
            "properties": {"participant_pause_sensitivity": "low"},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.sensitivity",
            "conversation_id": CID,
            "properties": {"participant_interrupt_sensitivity": "high"},
        },
        {
            "message_type": "conversation",
            "event_type": "conversation.tool_result",
            "conversation_id": CID,
            "properties": {"tool_call_id": "call_1", "output": '{"ok": true}', "status": "success"},
        },
    ]
    assert [exact(m) for m in r.received] == [exact(m) for m in expected]

    pcm = bytes(range(256)) * 47  # 12032 bytes: 0.25 s at 24 kHz -> chunks of 4800, 4800, 2432
    inference_id = await bot.echo_audio(pcm, sample_rate=24000)
    await r.wait_until(lambda: len(r.received) == 11)
    chunks = r.received[8:]
    assert [c["properties"]["done"] for c in chunks] == [False, False, True]
    assert {c["properties"]["inference_id"] for c in chunks} == {inference_id}
    assert all(
        c["properties"]["sample_rate"] == 24000 and c["properties"]["modality"] == "audio"
        for c in chunks
    )
    assert [len(base64.b64decode(c["properties"]["audio"])) for c in chunks] == [4800, 4800, 2432]
    assert b"".join(base64.b64decode(c["properties"]["audio"]) for c in chunks) == pcm
    assert list(chunks[0]) == ["message_type", "event_type", "conversation_id", "properties"]
    assert list(chunks[0]["properties"]) == [
        "modality",
        "audio",
        "sample_rate",
        "inference_id",
        "done",
    ]
    with pytest.raises(ValueError):
        await bot.echo_audio(b"\x00\x01\x02")

    await scene.finish()
    sent = await store.list_events(CID, source="bot", order="id")
    kinds = [e.kind for e in sent if e.kind.startswith("interaction.")]
    assert kinds == [
        "interaction.conversation.echo",
        "interaction.conversation.respond",
        "interaction.conversation.interrupt",
        "interaction.conversation.overwrite_llm_context",
        "interaction.conversation.append_llm_context",
        "interaction.conversation.sensitivity",
        "interaction.conversation.sensitivity",
        "interaction.conversation.tool_result",
        "interaction.conversation.echo",  # the audio, once, without the audio bytes
    ]
    assert sent[1].payload == expected[0]
    audio = [e for e in sent if e.inference_id == inference_id]
    assert len(audio) == 1 and "audio" not in audio[0].payload["properties"]
    assert audio[0].payload["properties"]["chunks"] == 3
    with pytest.raises(RoomClosed):
        await bot.echo("after the end")


async def failing_tool(args: dict[str, Any], ctx: Any) -> Any:
    raise RuntimeError("the backend is down")


async def slow_tool(args: dict[str, Any], ctx: Any) -> Any:
    await asyncio.sleep(30)


CALLS: list[dict[str, Any]] = []


async def counting_weather(args: dict[str, Any], ctx: Any) -> Any:
    CALLS.append(args)
    return await demo_weather(args, ctx)


def tool(
    name: str, handler: str, reply: str = "tool_result", timeout: float | None = None
) -> dict[str, Any]:
    return {
        "execution": "client",
        "handler": handler,
        "reply": reply,
        "timeout": timeout,
        "function": {"name": name, "parameters": {"type": "object", "properties": {}}},
    }


TOOL_PERSONA = Persona.model_validate(
    {
        "name": "tooly",
        "persona_name": "Tooly",
        "brain": {"kind": "echo"},
        "tools": [
            tool("get_current_weather", "tests.test_bot_session:counting_weather"),
            tool("weather_spoken", "cvi_agent.bot.handlers:demo_weather", reply="echo"),
            tool("weather_context", "cvi_agent.bot.handlers:demo_weather", reply="append_context"),
            tool("broken", "tests.test_bot_session:failing_tool"),
            tool("slow", "tests.test_bot_session:slow_tool", timeout=0.3),
            {"execution": "client", "function": {"name": "frontend_only"}},
        ],
    }
)


def tool_call(peer: ScriptedPeer, name: str, args: Any, call_id: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": name,
        "arguments": args if isinstance(args, str) else json.dumps(args),
    }
    if call_id is not None:
        props["tool_call_id"] = call_id
    return peer.event("conversation.tool_call", props, inference_id=f"inf-{call_id}")


async def test_tool_calls_are_answered_as_the_persona_says(
    server: LocalRoomServer, store: SqlStore
) -> None:
    CALLS.clear()
    scene = await open_scene(server, store, persona=TOOL_PERSONA)
    r = scene.replica
    call = tool_call(
        r,
        "get_current_weather",
        {"location": "San Francisco, CA", "unit": "fahrenheit"},
        "call_abc",
    )
    await r.send(call)
    await r.send(call)  # a duplicate delivery must not run the handler twice
    result = await r.wait_for(event_type_is("conversation.tool_result"))
    expected_output = json.dumps(
        await demo_weather({"location": "San Francisco, CA", "unit": "fahrenheit"}),
        ensure_ascii=False,
    )
    assert result["properties"] == {
        "tool_call_id": "call_abc",
        "output": expected_output,
        "status": "success",
    }

    await r.send(tool_call(r, "weather_spoken", {"location": "Paris"}, "call_echo"))
    spoken = await r.wait_for(event_type_is("conversation.echo"))
    summary = (await demo_weather({"location": "Paris"}))["summary"]
    assert spoken["properties"] == {"modality": "text", "text": summary}

    await r.send(tool_call(r, "weather_context", {"location": "Oslo"}, "call_ctx"))
    appended = await r.wait_for(event_type_is("conversation.append_llm_context"))
    assert json.loads(appended["properties"]["context"])["location"] == "Oslo"

    await r.send(tool_call(r, "broken", {}, "call_broken"))
    await r.send(tool_call(r, "slow", {}, "call_slow"))
    await r.send(tool_call(r, "get_current_weather", "{not json", "call_badargs"))
    await r.send(tool_call(r, "frontend_only", {}, "call_frontend"))  # no handler: not ours
    await r.send(tool_call(r, "not_declared", {}, "call_unknown"))
    errors: dict[str, Any] = {}
    async with asyncio.timeout(5):
        while len(errors) < 3:
            message = await r.wait_for(
                lambda m: (
                    isinstance(m, dict)
                    and m.get("event_type") == "conversation.tool_result"
                    and m["properties"]["tool_call_id"] not in errors
                    and m["properties"]["status"] == "error"
                )
            )
            errors[message["properties"]["tool_call_id"]] = json.loads(
                message["properties"]["output"]
            )
    assert errors == {
        "call_broken": {"error": "the tool failed"},
        "call_slow": {"error": "the tool timed out"},
        "call_badargs": {"error": "arguments are not valid JSON"},
    }
    await scene.bot.echo("still here")  # the bot kept running
    await r.wait_for(lambda m: m.get("properties", {}).get("text") == "still here")
    await asyncio.sleep(0.1)
    answered = {
        m["properties"].get("tool_call_id")
        for m in r.received
        if m.get("event_type") == "conversation.tool_result"
    }
    assert "call_frontend" not in answered and "call_unknown" not in answered
    assert len(CALLS) == 1

    await scene.finish()
    calls = {c.key: c for c in await store.list_tool_calls(CID)}
    assert calls["call_abc"].status == "success" and calls["call_abc"].output == expected_output
    assert calls["call_abc"].name == "get_current_weather"
    assert json.loads(calls["call_abc"].arguments) == {
        "location": "San Francisco, CA",
        "unit": "fahrenheit",
    }
    assert calls["call_echo"].status == "success"
    assert calls["call_broken"].status == "error" and "failed" in (
        calls["call_broken"].output or ""
    )
    assert calls["call_slow"].status == "error"
    assert calls["call_frontend"].status == "called"  # recorded, left to whoever answers it
    assert calls["call_unknown"].status == "called"
    assert scene.bot.stats.tool_errors == 3


async def test_out_of_order_events_are_stored_in_seq_order(
    server: LocalRoomServer, store: SqlStore
) -> None:
    recorder = Recorder(store, linger=0.3)
    recorder.start()
    scene = await open_scene(server, store, recorder=recorder)
    r = scene.replica
    base = 1746000000.0
    messages = {
        seq: r.event(
            "conversation.utterance",
            {"role": "user" if seq % 2 else "replica", "speech": f"line {seq}"},
            inference_id=f"i{seq}",
            seq=seq,
            timestamp=base + seq,
        )
        for seq in range(1, 7)
    }
    for seq in (4, 2, 6, 1, 5, 3):
        await r.send(messages[seq])
    await scene.finish()
    await recorder.close()
    stored = [e for e in await store.list_events(CID, source="room") if e.seq is not None]
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5, 6]
    by_insertion = [
        e.seq for e in await store.list_events(CID, source="room", order="id") if e.seq is not None
    ]
    assert by_insertion == [1, 2, 3, 4, 5, 6]  # reordered inside the recorder's batch
    assert [u.text for u in await store.list_utterances(CID)] == [f"line {i}" for i in range(1, 7)]


async def test_malformed_messages_do_not_stop_the_bot(
    server: LocalRoomServer, store: SqlStore
) -> None:
    scene = await open_scene(server, store)
    r = scene.replica
    bad: list[Any] = [
        "not json {",
        42,
        [1, 2, 3],
        None,
        {"no": "event_type"},
        {"event_type": "conversation.utterance", "properties": {"role": "user"}},  # no speech
        {"event_type": "conversation.tool_call", "properties": "{garbage"},
        {
            "event_type": "conversation.utterance",
            "seq": 10**30,
            "properties": {"role": "user", "speech": "huge seq"},
        },
        {"event_type": "x" * 500, "properties": {"k": "v"}},
        {
            "event_type": "conversation.utterance",
            "properties": {"role": "user", "speech": "nul\u0000byte"},
            "seq": 77,
        },
        {
            "event_type": "conversation.brand_new_thing",
            "seq": 78,
            "properties": {"nested": [{"a": 1}]},
        },
    ]
    for message in bad:
        await r.send(message)
    await r.say(
        "conversation.utterance",
        {"role": "user", "speech": "Still listening?"},
        inference_id="ok",
        seq=79,
    )
    await scene.bot.echo("Yes.")
    await r.wait_for(lambda m: m.get("properties", {}).get("text") == "Yes.")
    assert await scene.finish() == "the last human left"
    assert scene.bot.stats.invalid == 7
    assert scene.bot.stats.unknown == 2
    texts = [u.text for u in await store.list_utterances(CID)]
    assert texts == ["huge seq", "nulbyte", "Still listening?"]
    events = await store.list_events(CID, source="room", order="id")
    kinds = [e.kind for e in events]
    assert kinds.count("invalid") == 5
    assert "conversation.brand_new_thing" in kinds and ("x" * 128) in kinds
    kept = next(e for e in events if e.kind == "conversation.brand_new_thing")
    assert kept.payload == bad[-1]  # unknown events are stored whole
    not_json = next(
        e for e in events if e.kind == "invalid" and "not JSON" in e.payload.get("invalid", "")
    )
    assert not_json.payload["raw"] == json.dumps("not json {")


async def test_leaves_after_the_last_human_and_not_before(
    server: LocalRoomServer, store: SqlStore
) -> None:
    scene = await open_scene(server, store, leave_grace=0.6)
    url = server.room_url("conv")
    await scene.human.leave()
    await asyncio.sleep(0.2)
    second = await ScriptedPeer(url, user_name="Bob").join()  # back within the grace period
    await asyncio.sleep(0.8)
    assert not scene.runner.done()
    started = time.monotonic()
    await second.leave()
    reason = await asyncio.wait_for(scene.runner, 5)
    assert reason == "the last human left"
    assert 0.5 < time.monotonic() - started < 3
    await scene.replica.wait_until(lambda: len(scene.replica.inbox.left) == 3)  # Alice, Bob, bot
    assert scene.bot.room.state == "closed"
    assert all(p.user_name != "cvi-agent" for p in server.participants("conv"))
    await scene.replica.leave()
    left = [e for e in await store.list_events(CID, source="bot") if e.kind == "bot.left"]
    assert left and left[0].payload["reason"] == "the last human left"


async def test_shutdown_ends_the_conversation(server: LocalRoomServer, store: SqlStore) -> None:
    scene = await open_scene(server, store, leave_grace=30)
    await scene.replica.say("system.shutdown", {"shutdown_reason": "max_call_duration reached"})
    reason = await asyncio.wait_for(scene.runner, 5)
    assert reason == "conversation ended (max_call_duration reached)"
    await scene.human.leave()
    await scene.replica.leave()
    assert await store.count_events(CID, source="room") >= 3


async def test_no_human_ever_joins(server: LocalRoomServer, store: SqlStore) -> None:
    bot = ConversationBot(LocalRoom(), conversation_id=CID, store=store, absent_timeout=0.3)
    await bot.start(server.room_url("empty"))
    assert await asyncio.wait_for(bot.run(), 5) == "no human joined"


async def test_on_record_errors_are_logged_not_fatal(
    server: LocalRoomServer, store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def broken(record: EventRecord) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("feed is down")

    url = server.room_url("conv")
    replica = await ScriptedPeer(url, user_name="Replica", user_id="tavus-replica-1").join()
    human = await ScriptedPeer(url, user_name="Alice").join()
    bot = ConversationBot(
        LocalRoom(), conversation_id=CID, store=store, on_record=broken, leave_grace=0.1
    )
    await bot.start(url)
    runner = asyncio.create_task(bot.run())
    for i in range(5):
        await replica.say(
            "conversation.utterance", {"role": "user", "speech": f"n{i}"}, inference_id=f"n{i}"
        )
    await replica.wait_until(lambda: len(replica.inbox.joined) == 2)
    await human.leave()
    await asyncio.wait_for(runner, 5)
    await replica.leave()
    assert len(await store.list_utterances(CID)) == 5
    assert calls == await store.count_events(CID)
    assert "on_record hook failed" in caplog.text


async def test_stop_cancels_running_tools_and_records_it(
    server: LocalRoomServer, store: SqlStore
) -> None:
    persona = Persona.model_validate(
        {
            "name": "p",
            "persona_name": "Replica",
            "brain": {"kind": "echo"},
            "tools": [tool("slow", "tests.test_bot_session:slow_tool", timeout=60)],
        }
    )
    scene = await open_scene(server, store, persona=persona)
    await scene.replica.send(tool_call(scene.replica, "slow", {}, "call_slow"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await scene.bot.stop("operator ended it")
    assert await asyncio.wait_for(scene.runner, 5) == "operator ended it"
    assert time.monotonic() - started < 3
    await scene.human.leave()
    await scene.replica.leave()
    (call,) = await store.list_tool_calls(CID)
    assert call.status == "error" and "cancelled" in (call.output or "")


async def test_join_failure_is_recorded_and_raised(store: SqlStore) -> None:
    bot = ConversationBot(LocalRoom(join_timeout=0.3), conversation_id=CID, store=store)
    with pytest.raises(Exception, match="could not join"):
        await bot.start("ws://127.0.0.1:9/nowhere?t=meeting-token-0123456789")
    events = await store.list_events(CID)
    assert [e.kind for e in events] == ["bot.join_failed"]
    # The record is no place for a meeting token either (it rides in the room URL's `t`).
    assert "meeting-token-0123456789" not in json.dumps(events[0].payload)
    assert events[0].payload["url"].startswith("ws://127.0.0.1:9/nowhere")


# -- load ---------------------------------------------------------------------------------------------

BOTS = 100
EVENTS = 1000
DUPLICATES = 50


def script(peer: ScriptedPeer, n: int) -> list[dict[str, Any]]:
    """`n` distinct events in the Tavus format: utterances, streaming, speaking, unknown."""
    messages: list[dict[str, Any]] = []
    for i in range(n):
        turn = f"t{i // 4}"
        kind = i % 4
        if kind == 0:
            messages.append(
                peer.event(
                    "conversation.utterance",
                    {"role": "user", "speech": f"user {i}"},
                    inference_id=turn + "u",
                    turn_idx=i // 4,
                )
            )
        elif kind == 1:
            messages.append(
                peer.event(
                    "conversation.utterance",
                    {"role": "replica", "speech": f"replica {i}"},
                    inference_id=turn + "r",
                    turn_idx=i // 4,
                )
            )
        elif kind == 2:
            messages.append(
                peer.event(
                    "conversation.utterance.streaming",
                    {"role": "replica", "speech": f"replica {i - 1}", "final": True},
                    inference_id=turn + "r",
                )
            )
        else:
            messages.append(
                peer.event(
                    "conversation.started_speaking" if i % 8 == 3 else "conversation.mystery",
                    {"role": "replica"},
                )
            )
    return messages


async def run_load(store: SqlStore, bots: int) -> float:
    """`bots` bots at once, each hearing EVENTS events (+DUPLICATES re-deliveries); checks the
    rows and returns the elapsed seconds."""
    started = time.monotonic()
    async with LocalRoomServer() as srv:

        async def one(index: int) -> tuple[str, str]:
            cid = f"load-{index}"
            url = srv.room_url(cid)
            peer = await ScriptedPeer(
                url, conversation_id=cid, user_name="Replica", user_id="tavus-replica-x"
            ).join()
            bot = ConversationBot(
                LocalRoom(), conversation_id=cid, store=store, absent_timeout=None
            )
            await bot.start(url)
            runner = asyncio.create_task(bot.run())
            messages = script(peer, EVENTS)
            for message in messages:
                await peer.send(message)
            for message in messages[:: EVENTS // DUPLICATES]:
                await peer.send(message)  # re-delivered: must be stored once
            await peer.say("system.shutdown", {"shutdown_reason": "end"})
            reason = await asyncio.wait_for(runner, 60)
            await peer.leave()
            return cid, reason

        results = await asyncio.gather(*(one(i) for i in range(bots)))
    elapsed = time.monotonic() - started
    assert {reason for _, reason in results} == {"conversation ended (end)"}
    per_conversation = EVENTS + 1 + 1  # the script, the shutdown, the replica joining
    assert await store.count_events(source="room") == bots * per_conversation
    for cid, _ in results[:: max(1, bots // 10)]:
        assert await store.count_events(cid, source="room") == per_conversation
        utterances = await store.list_utterances(cid)
        assert len(utterances) == EVENTS // 2
        assert utterances[1].spoken_text == "replica 1"
    return elapsed


@pytest.mark.slow
async def test_a_hundred_bots_lose_and_duplicate_nothing(tmp_path: Any) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'load.db'}")
    try:
        elapsed = await run_load(store, BOTS)
    finally:
        await store.aclose()
    print(
        f"\n{BOTS} bots x {EVENTS} events (+{DUPLICATES} duplicates each), SQLite: {elapsed:.1f} s"
    )
    assert elapsed < 90


@pytest.mark.postgres
async def test_twenty_bots_on_postgresql(pg_url: str) -> None:
    store = await open_store(pg_url)
    try:
        elapsed = await run_load(store, 20)
    finally:
        await store.aclose()
    print(
        f"\n20 bots x {EVENTS} events (+{DUPLICATES} duplicates each), PostgreSQL: {elapsed:.1f} s"
    )
