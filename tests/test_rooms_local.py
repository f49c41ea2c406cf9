"""The local room (`rooms.local`, `rooms.local_server`): LocalRoom over a real LocalRoomServer
(loopback websockets): broadcast and direct messages, participants, tokens, malformed frames."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cvi_agent.rooms.base import Room, RoomJoinError, RoomSendError
from cvi_agent.rooms.local_server import LocalRoomServer
from tests.rooms_support import local


@pytest.fixture
async def server() -> Any:
    async with LocalRoomServer() as srv:
        yield srv


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
