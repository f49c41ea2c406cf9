"""The Redis connection turn coordination uses (llm/shared_turns.py), and its health.

Every call is bounded (`timeout`, no retries): a Redis that is unreachable or slow costs one
request at most `timeout`, then the link is *down*: callers answer in-process (`LinkDown`), one
warning is logged and `cvi_turns_coordination_up` drops to 0. While down, the hot path does not
touch Redis; the coordinator's heartbeat probes it every `retry_after` seconds and the link is
up again at the first call that succeeds (one info line).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cvi_agent import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class LinkDown(Exception):
    """Redis did not answer in time (or is known to be down): answer in-process."""


class RedisLink:
    """A Redis client whose failures switch the caller to in-process turns (see module doc).

    Args:
        url: the Redis URL (`CVI_REDIS_URL`).
        timeout: seconds one call may take, connecting included.
        retry_after: seconds between probes while the link is down.
    """

    def __init__(self, url: str, timeout: float = 0.25, retry_after: float = 2.0) -> None:
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.timeout = timeout
        self.retry_after = retry_after
        self.up = True
        self._retry_at = 0.0
        metrics.COORDINATION_UP.set(1)

    def usable(self, now: float) -> bool:
        """Whether a call may be tried now (`now`: the loop's clock)."""
        return self.up or now >= self._retry_at

    async def run(self, call: Awaitable[T]) -> T:
        """Await one Redis call within `timeout`; `LinkDown` (and the link marked down) when it
        fails or is late."""
        try:
            result = await asyncio.wait_for(call, self.timeout)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise LinkDown(str(exc)) from None
        if not self.up:
            self.up = True
            metrics.COORDINATION_UP.set(1)
            log.info("turn coordination: Redis reachable again; conversations are shared again")
        return result

    async def probe(self) -> bool:
        """Ping Redis if the link is down and its retry time has come; whether it is up."""
        if self.up:
            return True
        if asyncio.get_running_loop().time() < self._retry_at:
            return False
        try:
            await self.run(self.client.ping())
        except LinkDown:
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = asyncio.get_running_loop().time() + self.retry_after
        if self.up:
            self.up = False
            metrics.COORDINATION_UP.set(0)
            log.warning(
                "turn coordination: Redis unreachable or slow (%s): answering every "
                "conversation in this process until it is back",
                type(exc).__name__,
            )

    async def aclose(self) -> None:
        """Close the connections."""
        await self.client.aclose()

    def script(self, lua: str) -> Any:
        """A registered Lua script (called as `script(keys=[…], args=[…])`)."""
        return self.client.register_script(lua)
