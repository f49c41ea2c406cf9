"""DailyRoom (`rooms.daily`) against the real daily-python package offline (Daily's servers
cannot be reached from here)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from cvi_agent.rooms.base import Participant, RoomJoinError, RoomNotJoined, RoomSendError
from cvi_agent.rooms.daily import DailyRoom, describe_daily_error
from tests.rooms_support import Recorder


async def test_daily_unreachable_room_gives_up_within_the_bound() -> None:
    room = DailyRoom(user_name="cvi-agent", join_timeout=2.0)
    listener = Recorder()
    room.listener = listener
    early = asyncio.create_task(room.send_app_message({"queued": True}))
    await asyncio.sleep(0)
    assert early.done() and isinstance(early.exception(), RoomNotJoined)

    started = time.monotonic()
    join = asyncio.create_task(room.join("https://nonexistent.invalid/room"))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(room.send_app_message({"queued": True}))
    with pytest.raises(RoomJoinError) as info:
        await join
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, elapsed
    message = str(info.value)
    assert "https://nonexistent.invalid/room" in message and "\n" not in message
    assert "within 2 s" in message or "could not look up the room" in message
    assert room.state == "closed"
    with pytest.raises(RoomJoinError):
        await queued  # a message queued during the join is told the join failed
    await room.leave()


async def test_daily_invalid_url_fails_at_once_without_retrying() -> None:
    room = DailyRoom(join_timeout=10)
    started = time.monotonic()
    with pytest.raises(RoomJoinError, match="not a valid room URL") as info:
        await room.join("not a url")
    assert info.value.permanent and info.value.attempts == 1
    assert time.monotonic() - started < 2
    assert "Failed to parse url" in (info.value.detail or "")


async def test_daily_callbacks_from_native_threads_reach_the_loop() -> None:
    loop_thread = threading.get_ident()
    room = DailyRoom(user_name="cvi-agent")
    room._loop = asyncio.get_running_loop()
    errors: list[tuple[int, Any]] = []
    got_error = asyncio.Event()

    def on_error(message: Any) -> None:
        errors.append((threading.get_ident(), message))
        got_error.set()

    room._daily_error = on_error  # type: ignore[method-assign]
    room._ensure_client()
    # A real send on a client that is not connected: daily answers on its own thread, both through
    # the completion callback (-> our future) and through on_error (-> the handler).
    with pytest.raises(RoomSendError, match="signalling channel is not open"):
        await room._send({"hello": 1}, None)
    await asyncio.wait_for(got_error.wait(), 5)
    assert {thread for thread, _ in errors} == {loop_thread}
    assert "ChannelNotOpen" in str(errors[0][1])

    # Callbacks fired from any foreign thread land on the loop, in order.
    listener = Recorder()
    room.listener = listener
    handler = room._handler

    def fire() -> None:
        handler.on_participant_joined({"id": "p1", "info": {"userName": "Alice", "isLocal": False}})
        handler.on_app_message({"event_type": "x", "n": 1}, "p1")
        handler.on_app_message('{"event_type": "x", "n": 2}', "p1")
        handler.on_participant_left({"id": "p1", "info": {"userName": "Alice"}}, "leftCall")

    thread = threading.Thread(target=fire)
    thread.start()
    thread.join()
    await listener.until(lambda: listener.left)
    assert listener.threads == {loop_thread}
    assert listener.joined == [Participant(id="p1", user_name="Alice")]
    assert [m for m, _ in listener.messages] == [
        {"event_type": "x", "n": 1},
        '{"event_type": "x", "n": 2}',
    ]
    assert listener.left[0][1] == "leftCall"
    await room.leave()
    assert room._handler is None and room._client is None


def test_describe_daily_errors_in_one_line() -> None:
    raw = (
        "Connection(Api(RoomLookup(RoomInfoFetchFailed(Get(hyper_util::client::legacy::Error(Connect, "
        'Custom { kind: Uncategorized, error: "failed to lookup address information: Name or '
        'service not known" }))))))'
    )
    assert describe_daily_error(raw) == (
        "could not look up the room at Daily (failed to lookup address information: "
        "Name or service not known)"
    )
    assert describe_daily_error('Failed to parse url: InvalidUrl("x")') == "not a valid room URL"
    assert describe_daily_error("x\n" * 300).count("\n") == 0


MEDIA = ("camera", "microphone", "screenVideo", "screenAudio")


def _states(profiles: dict[str, Any] | None) -> dict[str, str]:
    assert profiles is not None
    return {m: profiles["base"][m]["subscriptionState"] for m in MEDIA}


async def test_daily_bot_listens_only_before_it_joins() -> None:
    """The profile is set on daily's real CallClient before `join` is called: the join below
    fails at once (a malformed URL), and the profile daily reports back is already listen-only."""
    room = DailyRoom(join_timeout=10)
    with pytest.raises(RoomJoinError, match="not a valid room URL"):
        await room.join("not a url")
    assert _states(room.applied_profiles) == dict.fromkeys(MEDIA, "unsubscribed")
    await room.leave()


async def test_daily_default_profile_would_receive_every_stream() -> None:
    """What the listen-only profile saves: daily-python's own default subscribes to everyone's
    camera, microphone and screen; a room given that default keeps it."""
    default = {"base": dict.fromkeys(MEDIA, "subscribed")}
    room = DailyRoom(subscription_profiles=default)
    profiles = await room.prepare()
    assert _states(profiles) == dict.fromkeys(MEDIA, "subscribed")
    listen_only = DailyRoom()
    assert _states(await listen_only.prepare()) == dict.fromkeys(MEDIA, "unsubscribed")
    await room.leave()
    await listen_only.leave()


async def test_daily_refused_profile_is_logged_and_the_join_goes_ahead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    room = DailyRoom(subscription_profiles={"base": {"camera": "nonsense"}}, join_timeout=10)
    with pytest.raises(RoomJoinError, match="not a valid room URL"):
        await room.join("not a url")  # the join was still attempted
    assert room.applied_profiles is None
    assert any("could not set the subscription profiles" in r.getMessage() for r in caplog.records)
    await room.leave()
