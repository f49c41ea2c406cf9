"""Rooms: LocalRoom over a real LocalRoomServer (loopback websockets), DailyRoom against the real
daily-python package offline (Daily's servers cannot be reached from here)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.rooms.room import (
    DailyRoom,
    LocalRoom,
    LocalRoomServer,
    Participant,
    Room,
    RoomClosed,
    RoomJoinError,
    RoomJoinTimeout,
    RoomListener,
    RoomNotJoined,
    RoomSendError,
    describe_daily_error,
)


class Recorder(RoomListener):
    def __init__(self) -> None:
        self.messages: list[tuple[Any, str | None]] = []
        self.joined: list[Participant] = []
        self.left: list[tuple[Participant, str | None]] = []
        self.disconnects: list[tuple[str, bool]] = []
        self.reconnects = 0
        self.threads: set[int] = set()
        self.changed = asyncio.Event()

    def _note(self) -> None:
        self.threads.add(threading.get_ident())
        self.changed.set()

    def on_app_message(self, message: Any, sender: str | None) -> None:
        self.messages.append((message, sender))
        self._note()

    def on_participant_joined(self, participant: Participant) -> None:
        self.joined.append(participant)
        self._note()

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        self.left.append((participant, reason))
        self._note()

    def on_disconnected(self, reason: str, permanent: bool) -> None:
        self.disconnects.append((reason, permanent))
        self._note()

    def on_reconnected(self) -> None:
        self.reconnects += 1
        self._note()

    async def until(self, condition: Any, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def local(name: str, **options: Any) -> tuple[LocalRoom, Recorder]:
    room = LocalRoom(user_name=name, **options)
    listener = Recorder()
    room.listener = listener
    return room, listener


@pytest.fixture
async def server() -> Any:
    async with LocalRoomServer() as srv:
        yield srv


# -- LocalRoom -------------------------------------------------------------------------------------


async def test_local_room_broadcast_participants_and_direct_messages(
    server: LocalRoomServer,
) -> None:
    a, la = local("alice", user_id="u-alice")
    b, lb = local("bob")
    c, lc = local("carol")
    assert isinstance(a, Room)
    url = server.room_url("conv-1")
    await a.join(url)
    await b.join(url)
    await c.join(url)
    await la.until(lambda: len(la.joined) == 2)
    assert {p.user_name for p in la.joined} == {"bob", "carol"}
    assert {p.user_name for p in lc.joined} == {"alice", "bob"}  # present before carol came
    assert lb.joined[0].user_id == "u-alice"
    assert set(a.participants()) == {b.local_participant.id, c.local_participant.id}  # type: ignore[union-attr]

    await a.send_app_message({"event_type": "hello", "n": 1})
    await lb.until(lambda: lb.messages)
    await lc.until(lambda: lc.messages)
    assert lb.messages == [({"event_type": "hello", "n": 1}, a.local_participant.id)]  # type: ignore[union-attr]
    assert la.messages == []  # never to the sender itself

    await c.send_app_message("just for alice", participant_id=a.local_participant.id)  # type: ignore[union-attr]
    await la.until(lambda: la.messages)
    assert la.messages[0][0] == "just for alice"
    await asyncio.sleep(0.05)
    assert len(lb.messages) == 1  # bob did not get carol's direct message

    await b.leave()
    await la.until(lambda: la.left)
    assert la.left[0][0].user_name == "bob" and la.left[0][1] == "left"
    assert b.state == "closed"
    await b.leave()  # idempotent
    other_room, lo = local("dave")
    await other_room.join(server.room_url("conv-2"))
    await a.send_app_message({"n": 2})
    await lc.until(lambda: len(lc.messages) == 2)
    assert lo.messages == []  # rooms are separate
    for room in (a, c, other_room):
        await room.leave()


async def test_send_before_join_is_reported_and_during_join_is_queued() -> None:
    room, _ = local("early", join_timeout=10, backoff_initial=0.05)
    with pytest.raises(RoomNotJoined, match="call join"):
        await room.send_app_message({"n": 0})

    port = free_port()
    url = f"ws://127.0.0.1:{port}/conv"
    join = asyncio.create_task(room.join(url))  # nothing listens yet: the join retries
    await asyncio.sleep(0.1)
    assert room.state == "joining"
    sends = [asyncio.create_task(room.send_app_message({"n": i})) for i in range(1, 4)]
    await asyncio.sleep(0.1)
    assert not any(s.done() for s in sends)

    async with LocalRoomServer(port=port) as srv:
        peer, lp = local("peer")
        await peer.join(srv.room_url("conv"))
        await join
        assert room.join_attempts > 1
        await asyncio.gather(*sends)
        await lp.until(lambda: len(lp.messages) == 3)
        assert [m for m, _ in lp.messages] == [{"n": 1}, {"n": 2}, {"n": 3}]  # in order
        await room.send_app_message({"n": 4})
        await lp.until(lambda: len(lp.messages) == 4)
        await room.leave()
        await peer.leave()


async def test_unreachable_local_room_gives_up_with_a_readable_error() -> None:
    port = free_port()
    room, _ = local("bot", join_timeout=1.5, backoff_initial=0.1)
    pending = None
    started = time.monotonic()
    with pytest.raises(RoomJoinTimeout) as info:
        join = asyncio.create_task(room.join(f"ws://127.0.0.1:{port}/x"))
        await asyncio.sleep(0)
        pending = asyncio.create_task(room.send_app_message({"queued": True}))
        await join
    elapsed = time.monotonic() - started
    assert elapsed < 3.0
    message = str(info.value)
    assert f"ws://127.0.0.1:{port}/x" in message and "within 1.5 s" in message
    assert "\n" not in message
    assert info.value.attempts >= 3  # retried with backoff, not once
    assert room.state == "closed"
    assert pending is not None
    with pytest.raises(RoomJoinTimeout):
        await pending  # the queued message learns why it was never sent
    with pytest.raises(RoomClosed):
        await room.send_app_message({"late": True})


async def test_rejected_token_and_bad_url_are_permanent() -> None:
    async with LocalRoomServer(tokens={"good"}) as srv:
        room, _ = local("bot", join_timeout=10)
        started = time.monotonic()
        with pytest.raises(RoomJoinError, match="meeting token rejected") as info:
            await room.join(srv.room_url("r"), meeting_token="bad")
        assert info.value.permanent and info.value.attempts == 1
        assert time.monotonic() - started < 2
        ok, _ = local("bot")
        await ok.join(srv.room_url("r"), meeting_token="good")
        await ok.leave()
    room, _ = local("bot")
    with pytest.raises(RoomJoinError, match="ws://") as info:
        await room.join("https://example.invalid/room")
    assert info.value.permanent


async def test_reconnects_after_a_drop_and_delivers_what_was_queued() -> None:
    port = free_port()
    srv = await LocalRoomServer(port=port).start()
    bot, lbot = local("bot", backoff_initial=0.05, reconnect_timeout=10)
    peer, lpeer = local("peer", backoff_initial=0.05, reconnect_timeout=10)
    await bot.join(srv.room_url("c"))
    await peer.join(srv.room_url("c"))
    await srv.close()  # the network goes away
    await srv.drop_connections()
    await lbot.until(lambda: lbot.disconnects)
    assert lbot.disconnects == [(lbot.disconnects[0][0], False)]
    assert str(bot.state) == "reconnecting"
    queued = asyncio.create_task(bot.send_app_message({"while": "away"}))
    await asyncio.sleep(0.3)
    assert not queued.done()
    srv = await LocalRoomServer(port=port).start()  # and comes back
    await lbot.until(lambda: lbot.reconnects == 1)
    await lpeer.until(lambda: lpeer.reconnects == 1)
    await queued
    await lpeer.until(lambda: any(m == {"while": "away"} for m, _ in lpeer.messages))
    assert bot.state == "joined"
    await bot.leave()
    await peer.leave()
    await srv.close()


async def test_gives_up_reconnecting_after_the_bound() -> None:
    srv = await LocalRoomServer().start()
    room, listener = local("bot", backoff_initial=0.05, reconnect_timeout=0.5)
    await room.join(srv.room_url("c"))
    await srv.close()
    await srv.drop_connections()
    await listener.until(lambda: any(permanent for _, permanent in listener.disconnects), 5)
    assert room.state == "closed"
    with pytest.raises(RoomClosed):
        await room.send_app_message({"x": 1})
    await room.leave()


async def test_server_survives_malformed_and_oversized_frames() -> None:
    async with LocalRoomServer(max_message_bytes=4096) as srv:
        good, lgood = local("good", max_message_bytes=4096)
        await good.join(srv.room_url("r"))
        async with connect(srv.room_url("r"), compression=None, proxy=None) as raw:
            await raw.send(json.dumps({"type": "join", "user_name": "raw"}))
            assert json.loads(await raw.recv())["type"] == "joined"
            for frame in ("not json", b"\xff\x00", "[1,2]", json.dumps({"type": "bogus"}), "{}"):
                await raw.send(frame)
                reply = json.loads(await raw.recv())
                assert reply["type"] == "error"
            await raw.send(json.dumps({"type": "app-message", "data": {"still": "works"}}))
            await lgood.until(lambda: lgood.messages)
            assert lgood.messages[0][0] == {"still": "works"}
            await raw.send(json.dumps({"type": "app-message", "data": "x" * 10_000}))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await raw.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        async with connect(srv.room_url("r"), compression=None, proxy=None) as raw:
            await raw.send("hello?")  # not a join
            assert json.loads(await raw.recv())["code"] == "bad_request"
        with pytest.raises(RoomSendError, match="too large"):
            await good.send_app_message("y" * 10_000)
        peer, lpeer = local("peer")
        await peer.join(srv.room_url("r"))
        await good.send_app_message({"after": "all that"})
        await lpeer.until(lambda: lpeer.messages)
        assert srv.malformed >= 4
        await good.leave()
        await peer.leave()


async def test_client_tolerates_malformed_frames_from_the_server() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(
            json.dumps({"type": "joined", "participant": {"id": "me"}, "participants": [{"id": 5}]})
        )
        for frame in (
            "garbage",
            "[]",
            json.dumps({"type": "app-message"}),
            json.dumps({"type": "participant-joined"}),
        ):
            await ws.send(frame)
        await ws.send(json.dumps({"type": "app-message", "from": "x", "data": {"ok": 1}}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        room, listener = local("bot")
        await room.join(f"ws://127.0.0.1:{port}/r")
        await listener.until(lambda: any(m == {"ok": 1} for m, _ in listener.messages))
        assert room.state == "joined"
        assert listener.joined == []  # the malformed participant was ignored
        await room.leave()


async def test_listener_errors_do_not_break_the_room(server: LocalRoomServer) -> None:
    class Exploding(Recorder):
        def on_app_message(self, message: Any, sender: str | None) -> None:
            super().on_app_message(message, sender)
            raise RuntimeError("boom")

    room = LocalRoom(user_name="bot")
    listener = Exploding()
    room.listener = listener
    peer, _ = local("peer")
    await room.join(server.room_url("r"))
    await peer.join(server.room_url("r"))
    await peer.send_app_message({"n": 1})
    await peer.send_app_message({"n": 2})
    await listener.until(lambda: len(listener.messages) == 2)
    assert room.state == "joined"
    await room.leave()
    await peer.leave()


# -- DailyRoom (real daily-python, offline) -----------------------------------------------------------


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


async def test_leave_while_joining_ends_the_join() -> None:
    port = free_port()
    room, _ = local("bot", join_timeout=30, backoff_initial=0.05)
    join = asyncio.create_task(room.join(f"ws://127.0.0.1:{port}/r"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await room.leave()
    with pytest.raises(RoomClosed, match="left while"):
        await join
    assert time.monotonic() - started < 2
    assert room.state == "closed"
    async with LocalRoomServer(port=port) as srv:
        await asyncio.sleep(0.3)
        assert srv.participants("r") == []  # it did not join behind our back
