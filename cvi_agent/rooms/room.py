"""Rooms: where the bot meets the replica. One `Room` protocol, two implementations.

- `DailyRoom` joins a real Daily room through daily-python. daily calls us back on its own
  native threads; every callback is handed to the asyncio loop with `call_soon_threadsafe`
  and nothing else happens on daily's thread. Completion callbacks resolve futures the same way.
- `LocalRoom` joins a `LocalRoomServer` over websockets: the same semantics on loopback, for
  tests, the simulator and local demos.

Both share `BaseRoom`: the join deadline and retry policy, the queue of messages sent before the
join completes, reconnection with backoff when an established connection drops, and the
participant list. Listener callbacks always run on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

log = logging.getLogger(__name__)

RoomState = Literal["idle", "joining", "joined", "reconnecting", "leaving", "closed"]

DEFAULT_JOIN_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024


# -- errors ----------------------------------------------------------------------------------------


class RoomError(Exception):
    """Anything that went wrong with a room; the message is one readable line."""


class RoomJoinError(RoomError):
    """Joining failed. `permanent` errors (a malformed URL, a rejected token) are not retried."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        detail: str | None = None,
        permanent: bool = False,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.detail = detail
        self.permanent = permanent
        self.attempts = attempts


class RoomJoinTimeout(RoomJoinError):
    """The join kept failing (or hanging) until the deadline."""


class RoomNotJoined(RoomError):
    """A send before `join()` was ever called."""


class RoomClosed(RoomError):
    """The room was left, or the connection was lost for good."""


class RoomSendError(RoomError):
    """A message could not be delivered to the room."""


# -- participants and listeners --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Participant:
    id: str
    user_name: str | None = None
    user_id: str | None = None
    local: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "user_name": self.user_name, "user_id": self.user_id}


class RoomListener:
    """What a room tells its owner. Called on the loop's thread; exceptions are logged."""

    def on_app_message(self, message: Any, sender: str | None) -> None:
        pass

    def on_participant_joined(self, participant: Participant) -> None:
        pass

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        pass

    def on_disconnected(self, reason: str, permanent: bool) -> None:
        """The connection dropped: `permanent` is False while reconnecting, True once given up."""

    def on_reconnected(self) -> None:
        pass


@runtime_checkable
class Room(Protocol):
    listener: RoomListener
    user_name: str

    @property
    def state(self) -> RoomState: ...

    async def join(self, url: str, meeting_token: str | None = None) -> None: ...

    async def send_app_message(self, message: Any, participant_id: str | None = None) -> None: ...

    async def leave(self) -> None: ...

    def participants(self) -> dict[str, Participant]: ...

    @property
    def local_participant(self) -> Participant | None: ...


# -- the shared policy -------------------------------------------------------------------------------


class BaseRoom:
    """Join deadline and retries, queued sends, reconnection, participants. Transports implement
    `_connect`, `_send`, `_disconnect` and `_release`, and report drops via `_connection_lost`.
    """

    def __init__(
        self,
        *,
        user_name: str = "cvi-agent",
        join_timeout: float = DEFAULT_JOIN_TIMEOUT,
        reconnect_timeout: float = 60.0,
        leave_timeout: float = 5.0,
        backoff_initial: float = 0.25,
        backoff_max: float = 5.0,
        max_pending: int = 1000,
    ) -> None:
        self.listener: RoomListener = RoomListener()
        self.user_name = user_name
        self.join_timeout = join_timeout
        self.reconnect_timeout = reconnect_timeout
        self.leave_timeout = leave_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_pending = max_pending
        self.join_attempts = 0
        self.url: str | None = None
        self._token: str | None = None
        self._state: RoomState = "idle"
        self._pending: deque[tuple[Any, str | None, asyncio.Future[None]]] = deque()
        self._participants: dict[str, Participant] = {}
        self._local: Participant | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None

    # public surface

    @property
    def state(self) -> RoomState:
        return self._state

    @property
    def local_participant(self) -> Participant | None:
        return self._local

    def participants(self) -> dict[str, Participant]:
        """Remote participants present now, by id."""
        return dict(self._participants)

    async def join(self, url: str, meeting_token: str | None = None) -> None:
        """Join, retrying transient failures until `join_timeout`; raises `RoomJoinError`."""
        if self._state != "idle":
            raise RoomError(f"join() was already called (the room is {self._state})")
        self._loop = asyncio.get_running_loop()
        self.url, self._token = url, meeting_token
        self._state = "joining"
        try:
            await self._connect_until(self.join_timeout, "join")
        except BaseException as exc:
            self._state = "closed"
            self._fail_pending(
                exc if isinstance(exc, RoomError) else RoomClosed("the join was cancelled")
            )
            await self._release_quietly()
            raise
        if self._state != "joining":  # leave() was called while the join was under way
            with contextlib.suppress(RoomError):
                await self._disconnect()
            await self._release_quietly()
            raise RoomClosed("the room was left while joining")
        self._set_joined()

    async def send_app_message(self, message: Any, participant_id: str | None = None) -> None:
        """Broadcast (or send to one participant). Before the join completes, and while
        reconnecting, the message is queued and sent (in order) once joined; the call returns
        when it was handed to the room, and raises `RoomError` if that never happens."""
        if self._state == "joined" and not self._pending:
            await self._send(message, participant_id)
            return
        if self._state == "idle":
            raise RoomNotJoined("the room is not joined: call join() before sending")
        if self._state not in ("joining", "joined", "reconnecting"):
            raise RoomClosed(f"cannot send: the room is {self._state}")
        if len(self._pending) >= self.max_pending:
            raise RoomSendError(
                f"cannot send: {len(self._pending)} messages already wait for the room to connect"
            )
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((message, participant_id, future))
        if self._state == "joined":
            self._start_flush()
        await future

    async def leave(self) -> None:
        """Leave and release resources; idempotent, bounded by `leave_timeout`."""
        if self._state in ("closed", "leaving"):
            return
        was = self._state
        self._state = "leaving"
        for task in (self._reconnect_task, self._flush_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail_pending(RoomClosed("the room was left before the message could be sent"))
        if was in ("joined", "reconnecting"):
            try:
                async with asyncio.timeout(self.leave_timeout):
                    await self._disconnect()
            except TimeoutError:
                log.warning(
                    "leaving %s took longer than %.0f s; releasing", self.url, self.leave_timeout
                )
            except RoomError as exc:
                log.warning("leaving %s: %s", self.url, exc)
        await self._release_quietly()
        self._participants.clear()
        self._state = "closed"

    async def close(self) -> None:
        await self.leave()

    async def __aenter__(self) -> BaseRoom:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leave()

    # transport hooks

    async def _connect(self, url: str, meeting_token: str | None) -> None:
        raise NotImplementedError

    async def _send(self, message: Any, participant_id: str | None) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    async def _release(self) -> None:
        """Free transport resources (must not block the loop)."""

    # for transports: all of these run on the loop's thread

    def _notify(self, name: str, *args: Any) -> None:
        try:
            getattr(self.listener, name)(*args)
        except Exception:
            log.exception("room listener %s failed", name)

    def _emit_app_message(self, message: Any, sender: str | None) -> None:
        if self._state in ("leaving", "closed"):
            return
        self._notify("on_app_message", message, sender)

    def _emit_joined(self, participant: Participant) -> None:
        if participant.local or self._state in ("leaving", "closed"):
            return
        known = participant.id in self._participants
        self._participants[participant.id] = participant
        if not known:
            self._notify("on_participant_joined", participant)

    def _emit_left(self, participant: Participant, reason: str | None) -> None:
        if participant.local or self._state in ("leaving", "closed"):
            return
        known = self._participants.pop(participant.id, None)
        if known is not None:
            self._notify("on_participant_left", known, reason)

    def _sync_participants(self, present: Iterable[Participant]) -> None:
        """After a (re)join: report who appeared and who left while we were away."""
        now = {p.id: p for p in present if not p.local}
        for pid, gone in list(self._participants.items()):
            if pid not in now:
                self._emit_left(gone, "left while disconnected")
        for p in now.values():
            self._emit_joined(p)

    def _connection_lost(self, reason: str) -> None:
        if self._state != "joined":
            return
        log.warning("connection to %s lost (%s); reconnecting", self.url, reason)
        self._state = "reconnecting"
        self._notify("on_disconnected", reason, False)
        assert self._loop is not None
        self._reconnect_task = self._loop.create_task(self._reconnect(reason))

    # internals

    async def _connect_until(self, budget: float, what: str) -> None:
        assert self._loop is not None and self.url is not None
        deadline = self._loop.time() + budget
        delay = self.backoff_initial
        last: RoomJoinError | None = None
        attempts = 0
        while True:
            if self._state in ("leaving", "closed"):
                raise RoomClosed(f"the room was left while trying to {what}")
            attempts += 1
            self.join_attempts += 1
            remaining = deadline - self._loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.0)) as scope:
                    await self._connect(self.url, self._token)
                return
            except TimeoutError:
                if not scope.expired():
                    raise
                because = f": {last}" if last is not None else " (no answer)"
                raise RoomJoinTimeout(
                    f"could not {what} {self.url} within {budget:g} s{because}",
                    url=self.url,
                    detail=last.detail if last else None,
                    attempts=attempts,
                ) from None
            except RoomJoinError as exc:
                exc.attempts = attempts
                if exc.permanent:
                    raise
                last = exc
            # The last attempt may start just before the deadline; none starts with no time left.
            delay = min(delay, deadline - self._loop.time() - 0.1)
            if delay < 0:
                raise RoomJoinTimeout(
                    f"could not {what} {self.url} within {budget:g} s "
                    f"({attempts} attempt{'s' if attempts != 1 else ''}): {last}",
                    url=self.url,
                    detail=last.detail,
                    attempts=attempts,
                )
            log.info("%s attempt %d failed: %s; retrying in %.1f s", what, attempts, last, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _set_joined(self) -> None:
        self._state = "joined"
        if self._pending:
            self._start_flush()

    def _start_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            assert self._loop is not None
            self._flush_task = self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and self._state == "joined":
            message, participant_id, future = self._pending[0]
            if future.done():  # the sender gave up waiting
                self._pending.popleft()
                continue
            try:
                await self._send(message, participant_id)
            except RoomError as exc:
                if self._state != "joined":
                    return  # stays queued; sent after the reconnect
                self._pending.popleft()
                if not future.done():
                    future.set_exception(exc)
                continue
            self._pending.popleft()
            if not future.done():
                future.set_result(None)

    def _fail_pending(self, exc: BaseException) -> None:
        while self._pending:
            _, _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning if nobody awaits

    async def _reconnect(self, reason: str) -> None:
        try:
            with contextlib.suppress(RoomError, TimeoutError):
                async with asyncio.timeout(self.leave_timeout):
                    await self._disconnect()
            await self._connect_until(self.reconnect_timeout, "rejoin")
        except RoomJoinError as exc:
            log.error("giving up on %s: %s", self.url, exc)
            self._state = "closed"
            self._fail_pending(RoomClosed(f"the connection was lost: {reason}"))
            await self._release_quietly()
            self._notify("on_disconnected", f"{reason}; {exc}", True)
            return
        log.info("reconnected to %s", self.url)
        self._set_joined()
        self._notify("on_reconnected")

    async def _release_quietly(self) -> None:
        try:
            await self._release()
        except Exception:
            log.exception("releasing the room failed")


# -- Daily -------------------------------------------------------------------------------------------

_daily_lock = threading.Lock()
_daily_ready = False
_handler_cls: type | None = None


def init_daily(worker_threads: int = 2) -> None:
    """`Daily.init()` exactly once per process (daily-python requires it)."""
    global _daily_ready
    with _daily_lock:
        if _daily_ready:
            return
        import daily

        daily.Daily.init(worker_threads=worker_threads, log_level=daily.LogLevel.Off)
        _daily_ready = True


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """From a foreign thread: schedule `fn(*args)` on the loop, or drop it if the loop is gone."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # loop closed: the room is gone, nothing to tell
        pass


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _arg(args: tuple[Any, ...], index: int) -> Any:
    """One argument of a daily completion: `(data, error)` for join, `(error,)` for the rest."""
    return args[index] if len(args) > index else None


def _daily_handler_class() -> type:
    """An EventHandler subclass that only forwards to the loop (defined lazily: daily is
    imported only when a DailyRoom is used)."""
    global _handler_cls
    if _handler_cls is not None:
        return _handler_cls
    import daily

    class _DailyHandler(daily.EventHandler):
        def __init__(self, room: DailyRoom, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__()
            self.room: DailyRoom | None = room
            self.loop = loop

        def _forward(self, name: str, *args: Any) -> None:
            room = self.room
            if room is not None:
                _call_soon(self.loop, getattr(room, name), *args)

        def on_app_message(self, message: Any, sender: Any) -> None:
            self._forward("_daily_app_message", message, sender)

        def on_participant_joined(self, participant: Any) -> None:
            self._forward("_daily_participant_joined", participant)

        def on_participant_left(self, participant: Any, reason: Any) -> None:
            self._forward("_daily_participant_left", participant, reason)

        def on_call_state_updated(self, state: Any) -> None:
            self._forward("_daily_call_state", state)

        def on_error(self, message: Any) -> None:
            self._forward("_daily_error", message)

    _handler_cls = _DailyHandler
    return _DailyHandler


_PERMANENT_DAILY = ("Failed to parse url", "InvalidUrl", "Invalid client settings")
_INNER_ERROR = re.compile(r'error: "([^"]{1,200})"')


def describe_daily_error(error: str) -> str:
    """daily's errors are Rust debug strings; say what happened in one short line."""
    text = str(error)
    inner = _INNER_ERROR.search(text)
    if "RoomInfoFetchFailed" in text or "RoomLookup" in text:
        why = inner.group(1) if inner else "network error"
        return f"could not look up the room at Daily ({why})"
    if "Failed to parse url" in text or "InvalidUrl" in text:
        return "not a valid room URL"
    if "ChannelNotOpen" in text:
        return "the room's signalling channel is not open"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _daily_participant(data: Any, local: bool = False) -> Participant | None:
    if not isinstance(data, dict):
        return None
    pid = data.get("id")
    if not isinstance(pid, str):
        return None
    info = data.get("info")
    if not isinstance(info, dict):
        info = {}
    name = info.get("userName")
    user_id = info.get("userId") or data.get("user_id")
    return Participant(
        id=pid,
        user_name=name if isinstance(name, str) else None,
        user_id=user_id if isinstance(user_id, str) else None,
        local=local or bool(info.get("isLocal")),
    )


# Joins as a data-only participant: no camera or microphone, nothing published.
DAILY_CLIENT_SETTINGS: dict[str, Any] = {
    "inputs": {"camera": False, "microphone": False},
    "publishing": {"camera": {"isPublishing": False}, "microphone": {"isPublishing": False}},
}


class DailyRoom(BaseRoom):
    """A Daily room through daily-python (one CallClient per room)."""

    def __init__(
        self,
        *,
        client_settings: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.client_settings = (
            client_settings if client_settings is not None else DAILY_CLIENT_SETTINGS
        )
        self._client: Any = None
        self._handler: Any = None

    def _ensure_client(self) -> Any:
        if self._client is None:
            init_daily()
            import daily

            assert self._loop is not None
            self._handler = _daily_handler_class()(self, self._loop)
            self._client = daily.CallClient(event_handler=self._handler)
        self._client.set_user_name(self.user_name)
        return self._client

    def _completion(self, future: asyncio.Future[Any]) -> Callable[..., None]:
        """A daily completion callback (runs on daily's thread) that resolves `future`."""
        loop = future.get_loop()

        def done(*args: Any) -> None:
            _call_soon(loop, _resolve, future, args)

        return done

    async def _connect(self, url: str, meeting_token: str | None) -> None:
        client = self._ensure_client()
        assert self._loop is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        client.join(
            url,
            meeting_token=meeting_token,
            client_settings=self.client_settings,
            completion=self._completion(future),
        )
        try:
            error = _arg(await future, 1)
        except asyncio.CancelledError:
            # The native join goes on; ask daily to leave once it is done with it.
            client.leave()
            raise
        if self._client is not client:
            raise RoomClosed("the room was left while joining")
        if error:
            permanent = any(marker in str(error) for marker in _PERMANENT_DAILY)
            raise RoomJoinError(
                f"cannot join {url}: {describe_daily_error(str(error))}",
                url=url,
                detail=str(error),
                permanent=permanent,
            )
        try:
            current = client.participants()
        except Exception:  # pragma: no cover - defensive: daily state while joining
            current = {}
        present = []
        for key, value in (current or {}).items():
            p = _daily_participant(value, local=key == "local")
            if p is None:
                continue
            if p.local:
                self._local = p
            else:
                present.append(p)
        self._sync_participants(present)

    async def _send(self, message: Any, participant_id: str | None) -> None:
        client = self._client
        if client is None:
            raise RoomSendError("the Daily client is not open")
        assert self._loop is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        client.send_app_message(
            message, participant_id=participant_id, completion=self._completion(future)
        )
        error = _arg(await future, 0)
        if error:
            raise RoomSendError(f"send failed: {describe_daily_error(str(error))}")

    async def _disconnect(self) -> None:
        client = self._client
        if client is None:
            return
        assert self._loop is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        client.leave(completion=self._completion(future))
        error = _arg(await future, 0)
        if error:
            raise RoomError(f"leave failed: {describe_daily_error(str(error))}")

    async def _release(self) -> None:
        client, handler = self._client, self._handler
        self._client = self._handler = None
        if handler is not None:
            handler.room = None  # nothing more reaches this room
        if client is None:
            return
        # release() blocks until an in-flight native join finishes (up to the resolver's timeout
        # offline). Do it on a daemon thread so neither the loop nor interpreter exit waits.
        threading.Thread(target=client.release, name="daily-release", daemon=True).start()

    # daily callbacks, already handed to the loop by _DailyHandler

    def _daily_app_message(self, message: Any, sender: Any) -> None:
        self._emit_app_message(message, sender if isinstance(sender, str) else None)

    def _daily_participant_joined(self, data: Any) -> None:
        p = _daily_participant(data)
        if p is not None:
            self._emit_joined(p)

    def _daily_participant_left(self, data: Any, reason: Any) -> None:
        p = _daily_participant(data)
        if p is not None:
            self._emit_left(p, reason if isinstance(reason, str) else None)

    def _daily_call_state(self, state: Any) -> None:
        log.debug("daily call state: %s", state)
        if state == "left" and self._state == "joined":
            self._connection_lost("Daily reported the call as left")

    def _daily_error(self, message: Any) -> None:
        if self._state in ("joined", "reconnecting"):
            log.warning("daily: %s", describe_daily_error(str(message)))
        else:
            log.debug("daily: %s", message)


def route_native_logs(logger_name: str = "daily", level: int = logging.DEBUG) -> None:
    """Send what native code writes to file descriptor 2 (daily's JSON log lines) through
    Python logging at `level`, so a command's stderr stays readable. Python's own `sys.stderr`
    keeps writing to the real stderr. Call once, before logging is configured."""
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w", closefd=False), encoding="utf-8", errors="replace", line_buffering=True
    )
    logger = logging.getLogger(logger_name)

    def pump() -> None:
        with open(read_fd, encoding="utf-8", errors="replace", closefd=True) as lines:
            for line in lines:
                text = line.rstrip("\n")
                if not text:
                    continue
                try:
                    record = json.loads(text)
                    message = record["fields"]["message"]
                except (ValueError, KeyError, TypeError):
                    sys.stderr.write(line)  # not daily's: pass through untouched
                    continue
                logger.log(level, "%s", message)

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()


# -- the local room (websockets) --------------------------------------------------------------------

LOCAL_JOIN_TIMEOUT = 5.0


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(slots=True)
class _Member:
    participant: Participant
    ws: ServerConnection
    outbox: asyncio.Queue[str | None]
    writer: asyncio.Task[None] | None = None


class LocalRoomServer:
    """A tiny room server: rooms by URL path, app-messages broadcast to every other participant
    (or sent to one), participant joined/left notifications. Frames are JSON objects:

    client → server: `{"type": "join", "user_name", "user_id", "meeting_token"}` (first frame),
    `{"type": "app-message", "data": <any JSON>, "to": <participant id or null>}`, `{"type": "leave"}`.
    server → client: `{"type": "joined", "participant", "participants"}`,
    `{"type": "app-message", "from", "data"}`, `{"type": "participant-joined", "participant"}`,
    `{"type": "participant-left", "participant", "reason"}`, `{"type": "error", "code", "message"}`.

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
        return f"ws://{self.host}:{self.port}"

    def room_url(self, name: str) -> str:
        return f"{self.url}/{name.strip('/')}"

    def participants(self, room: str) -> list[Participant]:
        return [m.participant for m in self.rooms.get(room.strip("/"), {}).values()]

    async def start(self) -> LocalRoomServer:
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
        hello = _loads_object(first)
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
            _dumps(
                {
                    "type": "joined",
                    "participant": member.participant.as_dict(),
                    "participants": [m.participant.as_dict() for m in members.values()],
                }
            )
        )
        member.writer = asyncio.get_running_loop().create_task(self._write(member))
        joined = _dumps({"type": "participant-joined", "participant": member.participant.as_dict()})
        for other in members.values():
            self._post(other, joined)
        members[member.participant.id] = member
        reason = "disconnected"
        try:
            async for frame in ws:
                message = _loads_object(frame)
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
            left = _dumps(
                {
                    "type": "participant-left",
                    "participant": member.participant.as_dict(),
                    "reason": reason,
                }
            )
            for other in members.values():
                self._post(other, left)

    def _relay(self, members: dict[str, _Member], sender: _Member, message: dict[str, Any]) -> None:
        frame = _dumps(
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
            await ws.send(_dumps({"type": "error", "code": code, "message": message}))


def _loads_object(frame: str | bytes) -> dict[str, Any] | None:
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
    """A client of `LocalRoomServer` with the same semantics as `DailyRoom`."""

    def __init__(
        self,
        *,
        user_id: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_timeout: float = LOCAL_JOIN_TIMEOUT,
        **options: Any,
    ) -> None:
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
                _dumps(
                    {
                        "type": "join",
                        "user_name": self.user_name,
                        "user_id": self.user_id,
                        "meeting_token": meeting_token,
                    }
                )
            )
            async with asyncio.timeout(self.open_timeout):
                reply = _loads_object(await ws.recv())
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
                message = _loads_object(frame)
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
            frame = _dumps({"type": "app-message", "data": message, "to": participant_id})
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
                await ws.send(_dumps({"type": "leave"}))
            await ws.close()
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _release(self) -> None:
        if self._ws is not None or self._reader is not None:
            await self._disconnect()
