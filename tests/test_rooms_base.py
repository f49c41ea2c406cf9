"""The policy every room shares (`rooms.base.BaseRoom`): queued sends, the join deadline and
retries, reconnection, leaving mid-join, listener isolation. Exercised through `LocalRoom` over
a real `LocalRoomServer` (loopback websockets)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.rooms.base import RoomClosed, RoomJoinTimeout, RoomNotJoined
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from tests.rooms_support import Recorder, local


@pytest.fixture
async def server() -> Any:
    async with LocalRoomServer() as srv:
        yield srv


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
