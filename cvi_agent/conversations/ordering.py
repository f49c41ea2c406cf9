"""Interactions of one conversation leave one at a time, in the order they were accepted.

Tavus delivers interactions in the order it receives them, and so does a room; what can
reorder them is us: two requests in flight at once (a retry of the first overtaking the
second, two web processes each sending one). So each delivery holds the conversation's *turn*
from before its first send to its final answer, and turns are granted first come, first served.

`LocalTurns` orders the requests of one process (an `asyncio.Lock` per conversation: its
waiters are woken in FIFO order). `RedisTurns` orders every process that shares Redis: a
request takes a ticket at the tail of the conversation's list (`RPUSH`, the moment it counts
as accepted) and its turn comes when its ticket is at the head. A ticket is kept alive by a
heartbeat key; the head ticket of a process that died is dropped once its heartbeat expires,
so a crash delays the queue by at most `ticket_ttl`, never stalls it. Waiting is bounded by
the caller (`TurnTimeout`, and the ticket leaves the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

log = logging.getLogger(__name__)

_PREFIX = "cvi:iturn:"

# Drop the head ticket if its holder's heartbeat is gone (the process died holding or waiting).
_DROP_DEAD_HEAD = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and head == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('LPOP', KEYS[1])
  return 1
end
return 0
"""


class TurnTimeout(Exception):
    """The conversation's earlier interactions did not finish within the wait allowed."""


@dataclass
class _Slot:
    lock: asyncio.Lock
    users: int = 0


class LocalTurns:
    """Turns per conversation within this process."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    @contextlib.asynccontextmanager
    async def turn(self, conversation_id: str, max_wait: float) -> AsyncIterator[None]:
        """Hold the conversation's turn for the block; `TurnTimeout` after `max_wait`."""
        slot = self._slots.setdefault(conversation_id, _Slot(asyncio.Lock()))
        slot.users += 1
        try:
            try:
                async with asyncio.timeout(max_wait):
                    await slot.lock.acquire()
            except TimeoutError:
                raise TurnTimeout(
                    f"earlier interactions of {conversation_id} still hold the line"
                ) from None
            try:
                yield
            finally:
                slot.lock.release()
        finally:
            slot.users -= 1
            if slot.users == 0:
                self._slots.pop(conversation_id, None)

    async def aclose(self) -> None:
        """Nothing to release in-process."""


class RedisTurns(LocalTurns):
    """Turns per conversation across every process sharing this Redis (module doc).

    If Redis cannot be reached, a turn is taken in this process only (logged): interactions
    keep flowing, ordered per process, rather than failing while Redis is away.
    """

    def __init__(
        self, client: redis.Redis, *, ticket_ttl: float = 5.0, poll: float = 0.005
    ) -> None:
        """Turns kept in Redis lists `cvi:iturn:<conversation id>`.

        Args:
            client: the Redis client (the caller closes it).
            ticket_ttl: seconds a ticket outlives its holder's last heartbeat (sent every
                third of it): how long a crashed process can hold the line.
            poll: first interval between looks at the queue's head (doubling to 50 ms).
        """
        super().__init__()
        self.redis = client
        self.ticket_ttl = ticket_ttl
        self.poll = poll
        self._drop: Any = client.register_script(_DROP_DEAD_HEAD)

    @contextlib.asynccontextmanager
    async def turn(self, conversation_id: str, max_wait: float) -> AsyncIterator[None]:
        """Take a ticket now, hold the turn for the block once it is at the head;
        `TurnTimeout` (the ticket withdrawn) after `max_wait`."""
        queue = _PREFIX + conversation_id
        token = uuid.uuid4().hex
        alive = f"{queue}:{token}"
        ttl_ms = int(self.ticket_ttl * 1000)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(alive, "1", px=ttl_ms)
                pipe.rpush(queue, token)
                pipe.pexpire(queue, ttl_ms * 12)
                await pipe.execute()
            queued = True
        except (redis.RedisError, OSError) as exc:
            log.warning("interaction order: Redis unavailable (%s); ordering in-process", exc)
            queued = False
        if not queued:
            async with super().turn(conversation_id, max_wait):
                yield
            return
        heartbeat = asyncio.create_task(self._heartbeat(queue, alive, ttl_ms))
        try:
            await self._wait_for_head(queue, token, max_wait)
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._leave(queue, token, alive)

    async def _wait_for_head(self, queue: str, token: str, max_wait: float) -> None:
        deadline = time.monotonic() + max_wait
        delay = self.poll
        while True:
            try:
                head = await self.redis.lindex(queue, 0)
                if head is not None and _text(head) == token:
                    return
                if head is None:
                    # The queue expired under us (a very long wait): take a place again.
                    await self.redis.rpush(queue, token)
                else:
                    other = _text(head)
                    await self._drop(keys=[queue, f"{queue}:{other}"], args=[other])
            except (redis.RedisError, OSError) as exc:
                log.warning("interaction order: Redis unavailable (%s); going ahead", exc)
                return
            if time.monotonic() + delay > deadline:
                raise TurnTimeout(
                    f"earlier interactions of {queue[len(_PREFIX) :]} still hold the line"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _heartbeat(self, queue: str, alive: str, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            with contextlib.suppress(redis.RedisError, OSError):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.pexpire(alive, ttl_ms)
                    pipe.pexpire(queue, ttl_ms * 12)
                    await pipe.execute()

    async def _leave(self, queue: str, token: str, alive: str) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrem(queue, 1, token)
                pipe.delete(alive)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # The ticket's heartbeat expires on its own; the next in line drops it then.
            log.warning("interaction order: could not leave the queue (%s)", exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_turns(client: redis.Redis | None) -> LocalTurns:
    """Turns shared through Redis when a client is given, else in-process."""
    return RedisTurns(client) if client is not None else LocalTurns()
