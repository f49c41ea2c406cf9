"""What every room is: the `Room` protocol its owner codes against, the `RoomListener` it reports
to, the `Participant` it lists, the errors it raises, and `BaseRoom`, the policy all transports
share.

A transport (`rooms.daily.DailyRoom`, `rooms.local.LocalRoom`) only opens, sends on, and closes
one connection. Everything a bot must be able to rely on whatever the transport is lives here,
once: the join deadline and retry policy, the queue of messages sent before the join completes,
reconnection with backoff when an established connection drops, and the participant list.
Listener callbacks always run on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

# Where a room is in its life; a room is used once (`join` from "idle", never again after "closed").
RoomState = Literal["idle", "joining", "joined", "reconnecting", "leaving", "closed"]

DEFAULT_JOIN_TIMEOUT = 30.0


# -- errors ----------------------------------------------------------------------------------------


class RoomError(Exception):
    """Anything that went wrong with a room; the message is one readable line, so a command can
    print it as is and a bot can catch one type whatever the transport."""


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
        """Describe one failed join.

        Args:
            message: The readable one-line reason, shown to whoever asked for the join.
            url: The room URL that could not be joined.
            detail: The transport's raw error, kept for debugging (it may span lines).
            permanent: True when retrying cannot help (bad URL, rejected token): the retry loop
                gives up at once instead of burning the join deadline.
            attempts: How many connection attempts were made; the retry loop fills it in.
        """
        super().__init__(message)
        self.url = url
        self.detail = detail
        self.permanent = permanent
        self.attempts = attempts


class RoomJoinTimeout(RoomJoinError):
    """The join kept failing (or hanging) until the deadline."""


class RoomNotJoined(RoomError):
    """A send before `join()` was ever called: a bug in the caller, not a network problem, so it
    is not queued like a send during the join."""


class RoomClosed(RoomError):
    """The room was left, or the connection was lost for good: nothing sent now can arrive."""


class RoomSendError(RoomError):
    """A message could not be delivered to the room (too large, not JSON, connection gone); the
    room itself may still be usable."""


# -- participants and listeners --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Participant:
    """Someone in a room, the same shape whatever the transport, so a bot can tell the replica
    from other humans or bots without knowing whose SDK it runs on. `local` marks ourselves."""

    id: str
    user_name: str | None = None
    user_id: str | None = None
    local: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON form used on the wire and in logs (`local` is ours alone, so left out)."""
        return {"id": self.id, "user_name": self.user_name, "user_id": self.user_id}


class RoomListener:
    """What a room tells its owner. Called on the loop's thread, so an owner needs no locks;
    exceptions are logged, so a faulty listener cannot break the room. Every method does
    nothing by default: override the ones you care about."""

    def on_app_message(self, message: Any, sender: str | None) -> None:
        """An app-message arrived from participant `sender` (None when the room did not say)."""

    def on_participant_joined(self, participant: Participant) -> None:
        """Someone else is now in the room (reported once per participant, also after a rejoin)."""

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        """Someone left, or left while we were disconnected (learned on rejoin)."""

    def on_disconnected(self, reason: str, permanent: bool) -> None:
        """The connection dropped: `permanent` is False while reconnecting, True once given up."""

    def on_reconnected(self) -> None:
        """The room is joined again after a drop; what was queued meanwhile is being sent."""


@runtime_checkable
class Room(Protocol):
    """What a bot needs from a room, so it runs unchanged on Daily, on a local room, or on a
    test double. `BaseRoom` and its transports implement it; see there for the semantics."""

    listener: RoomListener
    user_name: str

    @property
    def state(self) -> RoomState:
        """Where the room is in its life."""

    async def join(self, url: str, meeting_token: str | None = None) -> None:
        """Join once, within a deadline; raises `RoomJoinError`."""

    async def send_app_message(self, message: Any, participant_id: str | None = None) -> None:
        """Send to everyone else, or to one participant; raises `RoomError`."""

    async def leave(self) -> None:
        """Leave and release everything; idempotent."""

    def participants(self) -> dict[str, Participant]:
        """The remote participants present now, by id."""

    @property
    def local_participant(self) -> Participant | None:
        """Ourselves once joined (None before, or when the transport does not say)."""


# -- the shared policy -------------------------------------------------------------------------------


class BaseRoom:
    """Join deadline and retries, queued sends, reconnection, participants: written once here so
    every transport behaves the same when the network misbehaves. Transports implement
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
        """Set the policy; nothing connects before `join()`.

        Args:
            user_name: The name other participants see.
            join_timeout: Seconds `join()` keeps retrying transient failures before it raises
                `RoomJoinTimeout`.
            reconnect_timeout: Seconds to keep trying to rejoin after an established connection
                drops before giving up (`on_disconnected(..., permanent=True)`).
            leave_timeout: Seconds `leave()` waits for the transport to say goodbye before it
                releases resources anyway.
            backoff_initial: First delay between join attempts, in seconds; doubled each time.
            backoff_max: Longest delay between join attempts, in seconds.
            max_pending: Most messages queued while joining or reconnecting; past it a send
                fails with `RoomSendError` rather than letting memory grow without bound.
        """
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
        """Where the room is in its life."""
        return self._state

    @property
    def local_participant(self) -> Participant | None:
        """Ourselves as the room sees us, once joined."""
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
        """`leave()`, under the name `contextlib.aclosing` and resource owners expect."""
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
