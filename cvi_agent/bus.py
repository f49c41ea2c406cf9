"""Fan-out of JSON messages between the processes of one deployment.

Two kinds of channel (see `events_channel`, `commands_channel`): a conversation's live events
(every newly stored `EventRecord.as_dict()`, for live-feed websockets wherever they are
connected) and commands to a conversation's bot (wherever its worker runs), plus short-lived
reply channels and the workers' wake-up channel.

`InProcessBus` serves one process; `RedisBus` (when `CVI_REDIS_URL` is set) spans processes
over Redis pub/sub with ONE pub/sub connection per process, multiplexed to local subscribers.

Pub/sub is at-most-once. The bus never blocks a publisher: a subscriber that falls behind (its
queue is full) or a Redis reconnect yields a *gap* marker (`None`) instead, and the consumer
catches up from the store, which holds every event (the live feed does exactly that). Commands
are acknowledged on a reply channel, so a lost command is a timeout, never a silent success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from types import TracebackType
from typing import Any

import redis.asyncio as redis
from redis.asyncio.client import PubSub as _RedisPubSub

log = logging.getLogger(__name__)

Message = dict[str, Any]
PREFIX = "cvi:"
WORK_CHANNEL = PREFIX + "work"
_CONTROL_CHANNEL = PREFIX + "bus"


class BusUnavailable(Exception):
    """The bus could not publish or subscribe (Redis unreachable)."""


def events_channel(conversation_id: str) -> str:
    return f"{PREFIX}events:{conversation_id}"


def commands_channel(conversation_id: str) -> str:
    return f"{PREFIX}commands:{conversation_id}"


def reply_channel(request_id: str) -> str:
    return f"{PREFIX}reply:{request_id}"


class Subscription:
    """Messages of one channel for one consumer, in publish order; `None` marks a gap.

    Use as `async with bus.subscribe(channel) as sub:` — entering returns once the
    subscription is active, so anything published afterwards is delivered (or gapped).
    """

    def __init__(self, bus: Bus, channel: str, maxsize: int) -> None:
        self.bus = bus
        self.channel = channel
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize)
        self._overflowed = False
        self.dropped = 0

    def deliver(self, message: Message | None) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._overflowed = True
            if message is not None:
                self.dropped += 1

    async def next(self, max_wait: float | None = None) -> Message | None:
        """The next message, or `None` for a gap (messages were lost: resync from the store).

        Raises `TimeoutError` when `max_wait` seconds pass with nothing to return.
        """
        if self._queue.empty() and self._overflowed:
            self._overflowed = False
            return None
        if max_wait is None:
            return await self._queue.get()
        async with asyncio.timeout(max_wait):
            return await self._queue.get()

    def pending(self) -> int:
        return self._queue.qsize()

    async def __aenter__(self) -> Subscription:
        await self.bus._add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.bus._remove(self)


class Bus:
    """In-process fan-out; the base of `RedisBus`, which adds the cross-process hop."""

    def __init__(self) -> None:
        self._local: dict[str, set[Subscription]] = {}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        for subs in list(self._local.values()):
            for sub in list(subs):
                sub.deliver(None)
        self._local.clear()

    async def publish(self, channel: str, message: Message) -> int:
        """Send `message`; returns how many subscribers it reached (0: nobody is listening).

        In-process: local subscribers. Redis: subscribed connections, i.e. processes.
        """
        return self._fanout(channel, message)

    def subscribe(self, channel: str, *, maxsize: int = 1000) -> Subscription:
        return Subscription(self, channel, maxsize)

    def subscribers(self, channel: str) -> int:
        return len(self._local.get(channel, ()))

    def _fanout(self, channel: str, message: Message | None) -> int:
        subs = self._local.get(channel)
        if not subs:
            return 0
        for sub in list(subs):
            sub.deliver(message)
        return len(subs)

    async def _add(self, sub: Subscription) -> None:
        self._local.setdefault(sub.channel, set()).add(sub)

    async def _remove(self, sub: Subscription) -> bool:
        """Unregister; True when it was the channel's last local subscriber."""
        subs = self._local.get(sub.channel)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self._local[sub.channel]
        return True


InProcessBus = Bus


class RedisBus(Bus):
    """Redis pub/sub, one connection per process for all subscriptions (plus a publish pool)."""

    def __init__(self, url: str, client_name: str = "cvi-agent") -> None:
        super().__init__()
        self.url = url
        self.redis = redis.Redis.from_url(
            url, client_name=client_name, socket_connect_timeout=5, socket_timeout=10
        )
        self._pubsub = _TrackingPubSub(self.redis.connection_pool)
        self._confirm: dict[str, list[asyncio.Future[None]]] = {}
        # (UN)SUBSCRIBE commands sent whose confirmation has not arrived, per channel. Redis
        # answers in order, so a channel we want is active once its count is back to zero.
        self._inflight: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        try:
            await self.redis.ping()  # fail fast, with a clear error, when Redis is unreachable
        except (redis.RedisError, OSError) as exc:
            raise BusUnavailable(f"CVI_REDIS_URL: cannot reach Redis ({exc})") from exc
        fut = self._expect(_CONTROL_CHANNEL)
        self._local.setdefault(_CONTROL_CHANNEL, set())
        self._inflight[_CONTROL_CHANNEL] = 1
        await self._pubsub.subscribe(_CONTROL_CHANNEL)
        self._reader = asyncio.create_task(self._read(), name="redis-bus-reader")
        await asyncio.wait_for(fut, 10)

    async def aclose(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await super().aclose()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def publish(self, channel: str, message: Message) -> int:
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)
        try:
            return int(await self.redis.publish(channel, data))
        except (redis.RedisError, OSError) as exc:
            raise BusUnavailable(f"redis publish failed: {exc}") from exc

    def _expect(self, channel: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(channel, []).append(fut)
        return fut

    async def _add(self, sub: Subscription) -> None:
        async with self._lock:
            first = sub.channel not in self._local
            await super()._add(sub)
            if not first and not self._inflight.get(sub.channel):
                return  # already active
            fut = self._expect(sub.channel)
            if first:
                self._inflight[sub.channel] = self._inflight.get(sub.channel, 0) + 1
                try:
                    await self._pubsub.subscribe(sub.channel)
                except (redis.RedisError, OSError) as exc:
                    await super()._remove(sub)
                    raise BusUnavailable(f"redis subscribe failed: {exc}") from exc
        try:
            await asyncio.wait_for(asyncio.shield(fut), 10)
        except TimeoutError:
            await self._remove(sub)
            raise BusUnavailable("redis did not confirm the subscription in 10 s") from None
        except BaseException:
            await self._remove(sub)
            raise

    async def _remove(self, sub: Subscription) -> bool:
        async with self._lock:
            last = await super()._remove(sub)
            if last:
                self._inflight[sub.channel] = self._inflight.get(sub.channel, 0) + 1
                try:
                    await self._pubsub.unsubscribe(sub.channel)
                except Exception:
                    self._inflight[sub.channel] -= 1
            return last

    async def _read(self) -> None:
        delay = 0.1
        connects = self._pubsub.connects
        while not self._closing:
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("redis bus: connection problem (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if self._pubsub.connects != connects:
                # Reconnected (redis-py resubscribed for us): anything published meanwhile is
                # lost to this process; tell every consumer to resync.
                connects = self._pubsub.connects
                log.warning("redis bus: reconnected; signalling a gap to local subscribers")
                # What was in flight died with the old connection; redis-py resubscribed
                # every channel we want, and those confirmations are on their way.
                self._inflight = {channel: 1 for channel in self._local}
                for channel in list(self._local):
                    self._fanout(channel, None)
            if msg is None:
                continue
            kind = msg.get("type")
            channel = _text(msg.get("channel"))
            if kind in ("subscribe", "unsubscribe"):
                left = max(0, self._inflight.get(channel, 0) - 1)
                if left:
                    self._inflight[channel] = left
                    continue
                self._inflight.pop(channel, None)
                if channel in self._local:
                    for fut in self._confirm.pop(channel, []):
                        if not fut.done():
                            fut.set_result(None)
            elif kind == "message":
                try:
                    data = json.loads(msg["data"])
                except (TypeError, ValueError):
                    log.warning("redis bus: dropping a non-JSON message on %s", channel)
                    continue
                if isinstance(data, dict):
                    self._fanout(channel, data)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


class _TrackingPubSub(_RedisPubSub):
    """redis-py's PubSub, counting (re)connections so the reader can signal gaps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connects = 0

    async def on_connect(self, connection: Any) -> None:
        self.connects += 1
        await super().on_connect(connection)


def make_bus(redis_url: str | None) -> Bus:
    return RedisBus(redis_url) if redis_url else InProcessBus()


async def request(
    bus: Bus, channel: str, message: Message, request_id: str, max_wait: float
) -> tuple[int, Message | None]:
    """Publish `message` with a `reply_to` channel and wait for one reply.

    Returns (receivers, reply); reply is None when nobody answered within `max_wait` seconds.
    """
    async with bus.subscribe(reply_channel(request_id), maxsize=4) as replies:
        receivers = await bus.publish(
            channel, dict(message, id=request_id, reply_to=reply_channel(request_id))
        )
        if receivers == 0:
            return 0, None
        try:
            async with asyncio.timeout(max_wait):
                while True:
                    reply = await replies.next()
                    if reply is not None:
                        return receivers, reply
        except TimeoutError:
            return receivers, None
