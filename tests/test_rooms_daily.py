"""DailyRoom (`rooms.daily`) against the real daily-python package offline (Daily's servers
cannot be reached from here)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from cvi_agent.rooms import daily as daily_room
from cvi_agent.rooms.base import (
    Participant,
    RoomJoinError,
    RoomNotJoined,
    RoomSendError,
)
from cvi_agent.rooms.daily import DailyRoom, describe_daily_error, unreleased_clients
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
    await room._ensure_client()
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


# Many bots whose joins fail while others start: each room's release overlapped the next room's
# `CallClient()`. daily's destroy joins the client's event thread, which may still wait for the
# GIL to deliver a last event, while `CallClient()` held the GIL waiting for daily's core: the
# whole process froze. The script must finish its loop and exit; a frozen process is killed.
CHURN = """
import asyncio, sys, time
from cvi_agent.rooms.base import RoomError
from cvi_agent.rooms.daily import DailyRoom, unreleased_clients

async def one() -> None:
    room = DailyRoom(join_timeout=1.0)
    try:
        await room.join("not a url")
    except RoomError:
        pass
    await room.leave()

async def main(seconds: float) -> None:
    started, rooms = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        await asyncio.gather(one(), one())
        rooms += 2
    while unreleased_clients() and time.monotonic() - started < seconds + 5:
        await asyncio.sleep(0.05)
    print(rooms, unreleased_clients(), flush=True)

asyncio.run(main(float(sys.argv[1])))
"""


@pytest.mark.process
def test_daily_rooms_released_while_others_start_never_freeze_the_process() -> None:
    churn_seconds, allowed = 8.0, 25.0
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHURN, str(churn_seconds)],
            capture_output=True,
            text=True,
            timeout=allowed,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the process froze: no exit within {allowed:g} s of an {churn_seconds:g} s loop"
        )
    assert done.returncode == 0, done.stderr[-2000:]
    rooms, unreleased = (int(word) for word in done.stdout.split())
    assert rooms > 20, rooms
    assert unreleased == 0  # every CallClient was released once daily was done with it
    assert time.monotonic() - started < allowed


async def test_daily_clients_are_released_once_daily_is_done_with_them() -> None:
    """No CallClient (and its native threads) outlives its room for long: a failed join's client
    is released once daily delivered the join's completion and its trailing error event."""
    rooms = [DailyRoom(join_timeout=1.0) for _ in range(6)]
    natives = []
    for room in rooms:
        await room.prepare()  # makes daily's client
        natives.append(room._native)
        with pytest.raises(RoomJoinError):
            await room.join("not a url")
        await room.leave()
        assert room._native is None
    started = time.monotonic()
    while not all(n is not None and n.released for n in natives):
        assert time.monotonic() - started < 5, [n is not None and n.released for n in natives]
        await asyncio.sleep(0.02)


async def test_daily_room_left_while_its_join_is_resolving_does_not_wait_for_it() -> None:
    """Offline, daily resolves a daily.co room for ~20 s: a bot stopped meanwhile is gone at once
    and the loop keeps running; its client waits to be released until daily answered the join
    and the leave asked for after it."""
    room = DailyRoom(join_timeout=30)
    join = asyncio.create_task(room.join("https://cvi-agent-test.daily.co/room"))
    while room._client is None or room.join_attempts == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    native = room._native
    assert native is not None
    started = time.monotonic()
    join.cancel()  # the bot is stopped
    with pytest.raises(asyncio.CancelledError):
        await join
    await room.leave()
    assert time.monotonic() - started < 1.0
    assert not native.released and unreleased_clients() >= 1  # still owed the join's answer
    ticks = 0
    for _ in range(10):
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 10


async def test_daily_client_made_for_a_cancelled_room_is_still_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`CallClient()` runs on a worker thread; a room cancelled meanwhile (a bot stopped at
    once) still releases the client made for it, instead of leaving it to the garbage
    collector."""
    asked: list[Any] = []
    release = daily_room._NativeClient.release

    def recording(native: Any) -> None:
        asked.append(native)
        release(native)

    monkeypatch.setattr(daily_room._NativeClient, "release", recording)
    room = DailyRoom()
    preparing = asyncio.create_task(room.prepare())
    await asyncio.sleep(0)  # the worker thread is making the client
    preparing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await preparing
    assert room._native is None
    started = time.monotonic()
    while not (asked and asked[0].released):
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.02)
