"""`DailyRoom`: a Daily room through daily-python, for real calls with a Tavus replica.

daily calls us back on its own native threads; every callback is handed to the asyncio loop
with `call_soon_threadsafe` and nothing else happens on daily's thread. Completion callbacks
resolve futures the same way. The join deadline, retries, send queue and reconnection come from
`BaseRoom`; this module only speaks daily-python.

Releasing a `CallClient` is where daily can freeze the whole process. Its destroy occupies one of
daily's core threads until the client's event thread ends, and that thread may be waiting for the
GIL to deliver one last event or completion; a Python thread that meanwhile holds the GIL inside a
call that waits for daily's core (`CallClient()` itself does) then waits forever, and so does
every other Python thread. So a released room hands its client to `_NativeClient`, which releases
it on one reaper thread only once daily owes it nothing (every completion delivered, the call not
joining or leaving), and the calls that wait for daily's core take `_native_lock`, which the reaper
holds around `release()`; they run on a worker thread so the loop never waits for that lock.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cvi_agent.rooms.base import (
    BaseRoom,
    Participant,
    RoomClosed,
    RoomError,
    RoomJoinError,
    RoomSendError,
)

try:
    import daily
except ModuleNotFoundError as exc:  # pragma: no cover - daily-python is a dependency
    raise ModuleNotFoundError(
        f"{exc}. Daily rooms need daily-python: `pip install daily-python` "
        "(or reinstall cvi-agent, which depends on it)."
    ) from exc

log = logging.getLogger(__name__)

_daily_lock = threading.Lock()
_daily_ready = False

# Held around every daily call that waits for daily's core threads while holding the GIL
# (`CallClient()`, `participants()`) and by the reaper around `release()`: the two never overlap.
_native_lock = threading.Lock()
# Seconds the reaper leaves a client alone after daily's last completion, for the event that
# sometimes trails it (a failed join's `on_error`) to be delivered first.
RELEASE_GRACE = 0.1
# A client that daily still owes a completion, or whose call never reports that it stopped joining
# or leaving, is released anyway this many seconds after its room let it go (longer than an
# offline join takes to fail), rather than kept for the life of the process.
RELEASE_PATIENCE = 60.0
# How often the reaper looks for clients whose patience ran out.
_SWEEP_EVERY = 5.0


def init_daily(worker_threads: int = 2) -> None:
    """`Daily.init()` exactly once per process: daily-python requires it before the first
    `CallClient`, and a second call is an error. `DailyRoom` calls it; call it yourself only to
    choose `worker_threads` (daily's native threads) before the first room joins."""
    global _daily_ready
    with _daily_lock:
        if _daily_ready:
            return
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


class _DailyHandler(daily.EventHandler):
    """Runs on daily's native threads, so it only forwards each event to the loop."""

    def __init__(self, room: DailyRoom, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.room: DailyRoom | None = room
        self.loop = loop
        self.native: _NativeClient | None = None

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
        native = self.native
        if native is not None:
            native.call_state_updated(state)
        self._forward("_daily_call_state", state)

    def on_error(self, message: Any) -> None:
        self._forward("_daily_error", message)

    def on_subscription_profiles_updated(self, profiles: Any) -> None:
        self._forward("_daily_profiles", profiles)


class _NativeClient:
    """One daily `CallClient` and what daily still owes it: the completions not yet delivered
    and the call's last reported state. `release()` is asked for once; the reaper does it when
    daily is done with the client (see the module docstring)."""

    def __init__(self, handler: _DailyHandler) -> None:
        self.client: Any = daily.CallClient(event_handler=handler)
        handler.native = self
        self._lock = threading.Lock()
        self._pending = 0
        self._call_state: str | None = None
        self._release_asked: float | None = None
        self._queued = False
        self.released = False

    def request(self, method: str, deliver: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Call the client's `method` with a completion that runs `deliver`, counted until
        daily delivers it."""
        with self._lock:
            self._pending += 1

        def done(*results: Any) -> None:
            try:
                deliver(*results)
            finally:
                with self._lock:
                    self._pending -= 1
                self._maybe_release()

        try:
            getattr(self.client, method)(*args, completion=done, **kwargs)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise

    def call_state_updated(self, state: Any) -> None:
        """daily reported the call's state (on daily's thread)."""
        with self._lock:
            self._call_state = state if isinstance(state, str) else None
        self._maybe_release()

    def release(self) -> None:
        """Release the client once daily owes it nothing; until then it stays registered."""
        with self._lock:
            if self._release_asked is not None:
                return
            self._release_asked = time.monotonic()
        _unreleased.add(self)
        _reaper()
        self._maybe_release()

    def _releasable(self) -> bool:
        if self._release_asked is None or self._queued:
            return False
        if time.monotonic() - self._release_asked > RELEASE_PATIENCE:
            return True  # daily never said it was done: release rather than keep it forever
        return not self._pending and self._call_state not in ("joining", "joined", "leaving")

    def _maybe_release(self) -> None:
        with self._lock:
            if not self._releasable():
                return
            self._queued = True
        _reaper().put((time.monotonic() + RELEASE_GRACE, self))


_unreleased: set[_NativeClient] = set()  # strong references until released
_reaper_queue: queue.SimpleQueue[tuple[float, _NativeClient]] = queue.SimpleQueue()
_reaper_thread: threading.Thread | None = None
_reaper_lock = threading.Lock()


def _reap() -> None:
    while True:
        try:
            not_before, native = _reaper_queue.get(timeout=_SWEEP_EVERY)
        except queue.Empty:
            for waiting in list(_unreleased):
                waiting._maybe_release()
            continue
        time.sleep(max(0.0, not_before - time.monotonic()))
        try:
            with _native_lock:
                native.client.release()
        except Exception:  # pragma: no cover - defensive: daily refused the release
            log.exception("daily: releasing a client failed")
        native.released = True
        _unreleased.discard(native)


def _reaper() -> queue.SimpleQueue[tuple[float, _NativeClient]]:
    """The queue of the one thread that releases clients, one at a time (started on first use;
    a daemon, so interpreter exit never waits for it)."""
    global _reaper_thread
    with _reaper_lock:
        if _reaper_thread is None:
            _reaper_thread = threading.Thread(target=_reap, name="daily-release", daemon=True)
            _reaper_thread.start()
    return _reaper_queue


def unreleased_clients() -> int:
    """daily clients whose rooms were released but that daily still owes an event or completion
    (they are released as soon as it delivered them)."""
    return len(_unreleased)


class _Creation:
    """A `CallClient()` made on a worker thread for a coroutine that may be cancelled meanwhile:
    a client nobody will use is still released (never left to the garbage collector, whose
    destroy would hold the GIL)."""

    def __init__(self, handler: _DailyHandler) -> None:
        self.handler = handler
        self._lock = threading.Lock()
        self._native: _NativeClient | None = None
        self._abandoned = False

    def make(self) -> _NativeClient:
        """On a worker thread: the client, made while no release runs."""
        init_daily()
        with _native_lock:
            native = _NativeClient(self.handler)
        with self._lock:
            self._native, abandoned = native, self._abandoned
        if abandoned:
            native.release()
        return native

    def abandon(self) -> None:
        """On the loop, when the coroutine waiting for `make` was cancelled."""
        self.handler.room = None
        with self._lock:
            self._abandoned, native = True, self._native
        if native is not None:
            native.release()


def _participants(client: Any) -> Any:
    with _native_lock:
        return client.participants()


_PERMANENT_DAILY = ("Failed to parse url", "InvalidUrl", "Invalid client settings")
_INNER_ERROR = re.compile(r'error: "([^"]{1,200})"')


def describe_daily_error(error: str) -> str:
    """daily's errors are Rust debug strings, unreadable in a log line or a command's error
    message; say what happened in one short line."""
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

# ...and receives nothing either: the bot needs the room's app-messages and participant events,
# never the replica's or the user's media. Daily subscribes every participant to the `base`
# profile, which by default receives everyone's camera, microphone and screen share: a worker
# running 20 bots would pull 40+ media streams it never plays. (pipecat's Daily transport
# unsubscribes from video for the same reason.)
LISTEN_ONLY_PROFILES: dict[str, Any] = {
    "base": {
        "camera": "unsubscribed",
        "microphone": "unsubscribed",
        "screenVideo": "unsubscribed",
        "screenAudio": "unsubscribed",
    }
}
PROFILE_TIMEOUT = 5.0


class DailyRoom(BaseRoom):
    """A Daily room through daily-python, where a real Tavus replica talks (one CallClient per
    room, so rooms never share state)."""

    def __init__(
        self,
        *,
        client_settings: dict[str, Any] | None = None,
        subscription_profiles: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        """Create the room; daily's client is made at the first join.

        Args:
            client_settings: daily's client settings for the join; by default a data-only
                participant (`DAILY_CLIENT_SETTINGS`): no camera, no microphone.
            subscription_profiles: daily's subscription profiles, set before the first join;
                by default listen-only (`LISTEN_ONLY_PROFILES`): no one's camera, microphone
                or screen is received, only app-messages and participant events.
            **options: The join, reconnect and queue policy, passed to `BaseRoom` (see there).
        """
        super().__init__(**options)
        self.client_settings = (
            client_settings if client_settings is not None else DAILY_CLIENT_SETTINGS
        )
        self.subscription_profiles = (
            subscription_profiles if subscription_profiles is not None else LISTEN_ONLY_PROFILES
        )
        # What daily reported back once the profiles were set (None until then).
        self.applied_profiles: dict[str, Any] | None = None
        self._profiled: Any = None  # the client the profiles were set on
        self._profiles_updated: asyncio.Event | None = None
        self._client: Any = None
        self._handler: Any = None
        self._native: _NativeClient | None = None

    async def _ensure_client(self) -> Any:
        if self._client is None:
            assert self._loop is not None
            handler = _DailyHandler(self, self._loop)
            # `CallClient()` waits for daily's core with the GIL held: a worker thread waits for
            # `_native_lock`, never the loop.
            creation = _Creation(handler)
            try:
                native = await asyncio.to_thread(creation.make)
            except asyncio.CancelledError:
                creation.abandon()
                raise
            if self._client is not None:  # another coroutine of this room made one meanwhile
                creation.abandon()
            else:
                self._handler, self._native, self._client = handler, native, native.client
        self._client.set_user_name(self.user_name)
        return self._client

    def _request(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Call daily's `method` with a completion; the future resolves (on the loop) to the
        completion's arguments."""
        assert self._loop is not None and self._native is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        loop = self._loop

        def deliver(*results: Any) -> None:  # on daily's thread
            _call_soon(loop, _resolve, future, results)

        self._native.request(method, deliver, *args, **kwargs)
        return future

    async def prepare(self) -> dict[str, Any] | None:
        """Set the subscription profiles on daily's client (made here if need be), once per
        client, before it joins; returns the profiles as daily reports them. Needs no network.
        A refusal is logged and the join goes ahead: a bot that receives media still works."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        client = await self._ensure_client()
        if self._profiled is client:
            return self.applied_profiles
        updated = self._profiles_updated = asyncio.Event()
        future = self._request("update_subscription_profiles", self.subscription_profiles)
        try:
            async with asyncio.timeout(PROFILE_TIMEOUT):
                error = _arg(await future, 0)
                if not error:
                    # The completion says daily took them; the copy `subscription_profiles()`
                    # reads is refreshed by the event that follows.
                    await updated.wait()
        except TimeoutError:
            error = None if future.done() and not _arg(future.result(), 0) else "no answer"
        self._profiled = client
        if error:
            log.warning("daily: could not set the subscription profiles: %s", error)
            return None
        self.applied_profiles = client.subscription_profiles()
        log.debug("daily: subscription profiles %s", self.applied_profiles)
        return self.applied_profiles

    async def _connect(self, url: str, meeting_token: str | None) -> None:
        await self.prepare()
        client = await self._ensure_client()
        future = self._request(
            "join", url, meeting_token=meeting_token, client_settings=self.client_settings
        )
        try:
            error = _arg(await future, 1)
        except asyncio.CancelledError:
            # The native join goes on; ask daily to leave once it is done with it (the client is
            # released only after both completions were delivered).
            if self._client is client:
                self._request("leave")
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
            current = await asyncio.to_thread(_participants, client)
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
        future = self._request("send_app_message", message, participant_id=participant_id)
        error = _arg(await future, 0)
        if error:
            raise RoomSendError(f"send failed: {describe_daily_error(str(error))}")

    async def _disconnect(self) -> None:
        client = self._client
        if client is None:
            return
        future = self._request("leave")
        error = _arg(await future, 0)
        if error:
            raise RoomError(f"leave failed: {describe_daily_error(str(error))}")

    async def _release(self) -> None:
        handler, native = self._handler, self._native
        self._client = self._handler = self._native = None

        if handler is not None:
            handler.room = None  # nothing more reaches this room
        if native is not None:
            # Released by the reaper once daily delivered what it owes this client: an
            # in-flight join offline can take the resolver's timeout, and the loop never waits.
            native.release()

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

    def _daily_profiles(self, profiles: Any) -> None:
        if self._profiles_updated is not None:
            self._profiles_updated.set()

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
