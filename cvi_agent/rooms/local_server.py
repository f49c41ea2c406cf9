"""`LocalRoomServer`: the room server `LocalRoom` joins, for tests, the simulator and
`cvi-agent room serve`. It speaks the wire format described in `rooms.local`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cvi_agent.rooms.base import Participant
from cvi_agent.rooms.local import (
    DEFAULT_MAX_MESSAGE_BYTES,
    LOCAL_JOIN_TIMEOUT,
    decode_frame,
    encode_frame,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Member:
    participant: Participant
    ws: ServerConnection
    outbox: asyncio.Queue[str | None]
    writer: asyncio.Task[None] | None = None


class LocalRoomServer:
    """A tiny room server: rooms by URL path, app-messages broadcast to every other participant
    (or sent to one), participant joined/left notifications. Frames are JSON objects (the wire
    format is in `rooms.local`).

    Frames above `max_message_bytes` close the connection (1009); malformed frames are answered
    with an error frame and otherwise ignored. A receiver that falls `max_backlog` frames behind
    is disconnected rather than allowed to stall the room.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tokens: Collection[str] | None = None,
        max_backlog: int = 10_000,
    ) -> None:
        """Configure the server; it listens once `start()`ed (or entered with `async with`).

        Args:
            host: The address to listen on (loopback by default: the server has no TLS).
            port: The port; 0 picks a free one, read back from `port` or `url` once started.
            max_message_bytes: Largest frame accepted; a larger one closes the connection (1009).
            tokens: The meeting tokens a join must present; None lets anyone join, as tests do.
            max_backlog: Frames that may wait for a slow receiver before it is disconnected, so
                one stalled participant cannot stall the room or exhaust memory.
        """
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.tokens = frozenset(tokens) if tokens is not None else None
        self.max_backlog = max_backlog
        self.rooms: dict[str, dict[str, _Member]] = {}
        self.relayed = 0
        self.malformed = 0
        self._server: Server | None = None
        # (room, user name, user id) → loop time until which its joins are refused
        self._refused: dict[tuple[str, str | None, str | None], float] = {}

    @property
    def url(self) -> str:
        """The server's base URL (a room is a path under it)."""
        return f"ws://{self.host}:{self.port}"

    def room_url(self, name: str) -> str:
        """The URL a `LocalRoom` joins to be in room `name`."""
        return f"{self.url}/{name.strip('/')}"

    def participants(self, room: str) -> list[Participant]:
        """Who is in `room` now, as the server sees it (for tests that check nobody lingers)."""
        return [m.participant for m in self.rooms.get(room.strip("/"), {}).values()]

    async def start(self) -> LocalRoomServer:
        """Listen; returns once connections are accepted, with `port` set."""
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            max_size=self.max_message_bytes,
            compression=None,
            max_queue=64,
        )
        sock = next(iter(self._server.sockets))
        self.port = int(sock.getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening and close every connection cleanly (1001, going away); idempotent.
        `drop_connections` is the abrupt alternative, as a network failure would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LocalRoomServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def drop_connections(
        self,
        room: str | None = None,
        *,
        participants: Collection[str] | None = None,
        refuse_for: float = 0.0,
    ) -> int:
        """Cut connections abruptly, as a network failure would (for tests and demos).

        `participants`: only these participant ids (default: everyone). `refuse_for`: for that
        many seconds, a rejoin by a dropped participant (same room, user name and user id) is
        answered with a transient `unavailable` error, as a network that is still down would:
        the others stay in the room and go on talking without it."""
        dropped = 0
        until = asyncio.get_running_loop().time() + refuse_for
        for name, members in list(self.rooms.items()):
            if room is not None and name != room.strip("/"):
                continue
            for member in list(members.values()):
                p = member.participant
                if participants is not None and p.id not in participants:
                    continue
                if refuse_for > 0:
                    self._refused[(name, p.user_name, p.user_id)] = until
                member.ws.transport.abort()
                dropped += 1
        return dropped

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        room_name = urlsplit(request.path if request is not None else "/").path.strip("/")
        try:
            async with asyncio.timeout(LOCAL_JOIN_TIMEOUT):
                first = await ws.recv()
        except (TimeoutError, ConnectionClosed):
            return
        hello = decode_frame(first)
        if hello is None or hello.get("type") != "join":
            await self._error(ws, "bad_request", "the first frame must be a join")
            await ws.close(1008, "join first")
            return
        token = hello.get("meeting_token")
        if self.tokens is not None and token not in self.tokens:
            await self._error(ws, "forbidden", "meeting token rejected")
            await ws.close(4003, "forbidden")
            return
        user_name, user_id = hello.get("user_name"), hello.get("user_id")
        user_name = user_name[:256] if isinstance(user_name, str) else None
        user_id = user_id[:256] if isinstance(user_id, str) else None
        refused = self._refused.get((room_name, user_name, user_id))
        if refused is not None:
            if refused > asyncio.get_running_loop().time():
                await self._error(ws, "unavailable", "the room cannot be reached right now")
                await ws.close(1013, "try again later")
                return
            del self._refused[(room_name, user_name, user_id)]
        member = _Member(
            participant=Participant(
                id=str(uuid.uuid4()),
                user_name=user_name,
                user_id=user_id,
            ),
            ws=ws,
            outbox=asyncio.Queue(),
        )
        members = self.rooms.setdefault(room_name, {})
        await ws.send(
            encode_frame(
                {
                    "type": "joined",
                    "participant": member.participant.as_dict(),
                    "participants": [m.participant.as_dict() for m in members.values()],
                }
            )
        )
        member.writer = asyncio.get_running_loop().create_task(self._write(member))
        joined = encode_frame(
            {"type": "participant-joined", "participant": member.participant.as_dict()}
        )
        for other in members.values():
            self._post(other, joined)
        members[member.participant.id] = member
        reason = "disconnected"
        try:
            async for frame in ws:
                message = decode_frame(frame)
                kind = message.get("type") if message is not None else None
                if kind == "app-message":
                    self._relay(members, member, message)  # type: ignore[arg-type]
                elif kind == "leave":
                    reason = "left"
                    break
                else:
                    self.malformed += 1
                    await self._error(ws, "bad_frame", "expected an app-message or leave frame")
        except ConnectionClosed:
            pass
        finally:
            members.pop(member.participant.id, None)
            if not members:
                self.rooms.pop(room_name, None)
            self._post(member, None)
            left = encode_frame(
                {
                    "type": "participant-left",
                    "participant": member.participant.as_dict(),
                    "reason": reason,
                }
            )
            for other in members.values():
                self._post(other, left)

    def _relay(self, members: dict[str, _Member], sender: _Member, message: dict[str, Any]) -> None:
        frame = encode_frame(
            {"type": "app-message", "from": sender.participant.id, "data": message.get("data")}
        )
        to = message.get("to")
        if isinstance(to, str):
            target = members.get(to)
            if target is not None and target is not sender:
                self._post(target, frame)
                self.relayed += 1
            return
        for other in members.values():
            if other is not sender:
                self._post(other, frame)
                self.relayed += 1

    def _post(self, member: _Member, frame: str | None) -> None:
        if member.outbox.qsize() >= self.max_backlog and frame is not None:
            log.warning(
                "local room: participant %s is too slow; disconnecting", member.participant.id
            )
            member.ws.transport.abort()
            return
        member.outbox.put_nowait(frame)

    async def _write(self, member: _Member) -> None:
        while True:
            frame = await member.outbox.get()
            if frame is None:
                return
            try:
                await member.ws.send(frame)
            except ConnectionClosed:
                return

    async def _error(self, ws: ServerConnection, code: str, message: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode_frame({"type": "error", "code": code, "message": message}))
