"""`LocalRoom`: a room on loopback websockets with the same semantics as a Daily room, so tests,
the simulator and local demos run a bot without Daily's servers (`rooms.local_server` serves it).

The wire format, shared by the client here and `LocalRoomServer`. Rooms are named by the URL's
path; every frame is a JSON object:

- client → server: `{"type": "join", "user_name", "user_id", "meeting_token"}` (first frame),
  `{"type": "app-message", "data": <any JSON>, "to": <participant id or null>}`,
  `{"type": "leave"}`.
- server → client: `{"type": "joined", "participant", "participants"}`,
  `{"type": "app-message", "from", "data"}`, `{"type": "participant-joined", "participant"}`,
  `{"type": "participant-left", "participant", "reason"}`, `{"type": "error", "code", "message"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from cvi_agent.rooms.base import (
    BaseRoom,
    Participant,
    RoomJoinError,
    RoomSendError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
LOCAL_JOIN_TIMEOUT = 5.0


def encode_frame(value: Any) -> str:
    """One frame of the wire format. Non-ASCII text stays UTF-8: `\\u` escapes would take up to
    three times the bytes counted against `max_message_bytes`."""
    return json.dumps(value, ensure_ascii=False)


def decode_frame(frame: str | bytes) -> dict[str, Any] | None:
    """A frame as a JSON object, or None when it is not one: a peer's malformed frame is
    answered or ignored, never allowed to raise into the connection's loop."""
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        value = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _local_participant(data: Any) -> Participant | None:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    name, user_id = data.get("user_name"), data.get("user_id")
    return Participant(
        id=data["id"],
        user_name=name if isinstance(name, str) else None,
        user_id=user_id if isinstance(user_id, str) else None,
    )


class LocalRoom(BaseRoom):
    """A client of `LocalRoomServer` with the same semantics as `DailyRoom`, so whatever a bot
    does on Daily can be tested, simulated and demonstrated on loopback."""

    def __init__(
        self,
        *,
        user_id: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_timeout: float = LOCAL_JOIN_TIMEOUT,
        **options: Any,
    ) -> None:
        """Create the room; nothing connects before `join()`.

        Args:
            user_id: The `user_id` other participants see (Daily's `userId`), if any.
            max_message_bytes: Largest frame sent or received; larger sends fail with
                `RoomSendError` (match the server's limit, which closes the connection instead).
            open_timeout: Seconds one connection attempt may take, handshake and join reply
                included, before it counts as failed and is retried.
            **options: The join, reconnect and queue policy, passed to `BaseRoom` (see there);
                `join_timeout` defaults to 10 s here, as a local server answers at once or not at
                all.
        """
        options.setdefault("join_timeout", 10.0)
        super().__init__(**options)
        self.user_id = user_id
        self.max_message_bytes = max_message_bytes
        self.open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _connect(self, url: str, meeting_token: str | None) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("ws", "wss"):
            raise RoomJoinError(
                f"cannot join {url}: a local room URL starts with ws:// or wss://",
                url=url,
                permanent=True,
            )
        try:
            ws = await connect(
                url,
                max_size=self.max_message_bytes,
                compression=None,
                open_timeout=self.open_timeout,
                proxy=None,
            )
        except InvalidURI as exc:
            raise RoomJoinError(f"cannot join {url}: {exc}", url=url, permanent=True) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise RoomJoinError(
                f"cannot join {url}: {exc or type(exc).__name__}", url=url, detail=repr(exc)
            ) from exc
        try:
            await ws.send(
                encode_frame(
                    {
                        "type": "join",
                        "user_name": self.user_name,
                        "user_id": self.user_id,
                        "meeting_token": meeting_token,
                    }
                )
            )
            async with asyncio.timeout(self.open_timeout):
                reply = decode_frame(await ws.recv())
        except (ConnectionClosed, TimeoutError) as exc:
            await ws.close()
            raise RoomJoinError(f"cannot join {url}: no join reply ({exc})", url=url) from exc
        except BaseException:
            await ws.close()
            raise
        if reply is None or reply.get("type") != "joined":
            await ws.close()
            message = (reply or {}).get("message") or "unexpected reply"
            raise RoomJoinError(
                f"cannot join {url}: {message}",
                url=url,
                detail=json.dumps(reply) if reply else None,
                permanent=(reply or {}).get("code") == "forbidden",
            )
        self._ws = ws
        self._local = _local_participant(reply.get("participant"))
        if self._local is not None:
            self._local = Participant(
                self._local.id, self._local.user_name, self._local.user_id, local=True
            )
        present = [
            p for p in map(_local_participant, reply.get("participants") or []) if p is not None
        ]
        self._sync_participants(present)
        assert self._loop is not None
        self._reader = self._loop.create_task(self._read(ws))

    async def _read(self, ws: ClientConnection) -> None:
        reason = "connection closed"
        try:
            async for frame in ws:
                message = decode_frame(frame)
                if message is None:
                    log.debug("local room: ignoring a malformed frame")
                    continue
                kind = message.get("type")
                if kind == "app-message":
                    sender = message.get("from")
                    self._emit_app_message(
                        message.get("data"), sender if isinstance(sender, str) else None
                    )
                elif kind == "participant-joined":
                    p = _local_participant(message.get("participant"))
                    if p is not None:
                        self._emit_joined(p)
                elif kind == "participant-left":
                    p = _local_participant(message.get("participant"))
                    if p is not None:
                        why = message.get("reason")
                        self._emit_left(p, why if isinstance(why, str) else None)
                elif kind == "error":
                    log.warning("local room: %s", message.get("message"))
        except ConnectionClosed as exc:
            reason = f"connection closed ({exc})"
        finally:
            if self._ws is ws:
                self._connection_lost(reason)

    async def _send(self, message: Any, participant_id: str | None) -> None:
        ws = self._ws
        if ws is None:
            raise RoomSendError("not connected")
        try:
            frame = encode_frame({"type": "app-message", "data": message, "to": participant_id})
        except (TypeError, ValueError) as exc:
            raise RoomSendError(f"the message is not JSON-serializable: {exc}") from exc
        size = len(frame.encode("utf-8"))
        if size > self.max_message_bytes:
            raise RoomSendError(
                f"the message is too large ({size} bytes; the limit is {self.max_message_bytes})"
            )
        try:
            await ws.send(frame)
        except ConnectionClosed as exc:
            raise RoomSendError(f"send failed: connection closed ({exc})") from exc

    async def _disconnect(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode_frame({"type": "leave"}))
            await ws.close()
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _release(self) -> None:
        if self._ws is not None or self._reader is not None:
            await self._disconnect()
