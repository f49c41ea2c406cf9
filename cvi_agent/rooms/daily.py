"""`DailyRoom`: a Daily room through daily-python, for real calls with a Tavus replica.

daily calls us back on its own native threads; every callback is handed to the asyncio loop
with `call_soon_threadsafe` and nothing else happens on daily's thread. Completion callbacks
resolve futures the same way. The join deadline, retries, send queue and reconnection come from
`BaseRoom`; this module only speaks daily-python.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import sys
import threading
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

    def on_subscription_profiles_updated(self, profiles: Any) -> None:
        self._forward("_daily_profiles", profiles)


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

    def _ensure_client(self) -> Any:
        if self._client is None:
            init_daily()
            assert self._loop is not None
            self._handler = _DailyHandler(self, self._loop)
            self._client = daily.CallClient(event_handler=self._handler)
        self._client.set_user_name(self.user_name)
        return self._client

    def _completion(self, future: asyncio.Future[Any]) -> Callable[..., None]:
        """A daily completion callback (runs on daily's thread) that resolves `future`."""
        loop = future.get_loop()

        def done(*args: Any) -> None:
            _call_soon(loop, _resolve, future, args)

        return done

    async def prepare(self) -> dict[str, Any] | None:
        """Set the subscription profiles on daily's client (made here if need be), once per
        client, before it joins; returns the profiles as daily reports them. Needs no network.
        A refusal is logged and the join goes ahead: a bot that receives media still works."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        client = self._ensure_client()
        if self._profiled is client:
            return self.applied_profiles
        assert self._loop is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        updated = self._profiles_updated = asyncio.Event()
        client.update_subscription_profiles(
            self.subscription_profiles, completion=self._completion(future)
        )
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
