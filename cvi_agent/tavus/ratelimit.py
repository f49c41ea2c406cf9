"""A client-side limit on the requests we send Tavus with one API key.

Tavus answers 429 "Too many requests" past its limit, per key. Every process that uses the key
counts against the same limit, so with `CVI_REDIS_URL` the bucket lives in Redis (one Lua
script: refill, take one, or say how long to wait) and every process shares it; without Redis
it lives in the process. Callers wait for a token within a deadline rather than being refused
at once: an interaction that must wait a second is better than one that fails.

The key is never a Redis key name or a log field: buckets are named by a hash of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any

import redis.asyncio as redis

log = logging.getLogger(__name__)

_PREFIX = "cvi:tavus-rate:"


class RateLimitTimeout(Exception):
    """No request slot within the caller's deadline; `retry_after` says when one frees up."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"no request slot for {retry_after:.2f}s")
        self.retry_after = retry_after


def key_id(api_key: str) -> str:
    """What a bucket is named by: a short hash, so the key itself is never stored or shown."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


class RateLimiter:
    """A token bucket per API key, in this process: `rate` requests a second on average,
    bursts of `burst`. `RedisRateLimiter` shares the same buckets between processes."""

    def __init__(self, rate: float, burst: int) -> None:
        """Empty buckets; each key's fills on first use.

        Args:
            rate: requests a second each key may send on average; 0 turns the limit off.
            burst: requests a key may send at once after a quiet spell (at least 1).
        """
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, at)
        self.waited = 0.0  # seconds callers spent waiting for a slot (for tests and logs)

    async def acquire(self, api_key: str, max_wait: float) -> None:
        """Take one request slot for `api_key`, waiting up to `max_wait` seconds for it;
        raises `RateLimitTimeout` (without taking a slot) when none frees up in time."""
        if self.rate <= 0:
            return
        bucket = key_id(api_key)
        deadline = time.monotonic() + max(0.0, max_wait)
        while True:
            wait = await self._take(bucket)
            if wait <= 0:
                return
            left = deadline - time.monotonic()
            if wait > left:
                raise RateLimitTimeout(wait)
            self.waited += wait
            await asyncio.sleep(wait)

    async def _take(self, bucket: str) -> float:
        """Take a token if there is one (0.0), else the seconds until there will be."""
        now = time.monotonic()
        tokens, at = self._buckets.get(bucket, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[bucket] = (tokens - 1.0, now)
            return 0.0
        self._buckets[bucket] = (tokens, now)
        return (1.0 - tokens) / self.rate

    async def aclose(self) -> None:
        """Release what the limiter holds (nothing in the process's own variant)."""


# Refill by elapsed time (Redis's clock, so processes on different machines agree), then take one
# token or return how many milliseconds until one is there. Returns an integer (Lua numbers
# become integers on the way out): 0 = taken.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RedisRateLimiter(RateLimiter):
    """The same buckets, in Redis, shared by every process that uses the key.

    If Redis does not answer, the limit falls back to this process's own bucket (logged once
    per outage): requests keep flowing, limited per process, rather than all failing.
    """

    def __init__(self, client: redis.Redis, rate: float, burst: int) -> None:
        """Buckets in Redis, shared by every process using the same key.

        Args:
            client: the Redis client to run the bucket script on (the caller closes it).
            rate: requests a second each key may send on average; 0 turns the limit off.
            burst: requests a key may send at once after a quiet spell.
        """
        super().__init__(rate, burst)
        self.redis = client
        self._script: Any = client.register_script(_TAKE)
        self._degraded = False

    async def _take(self, bucket: str) -> float:
        try:
            wait_ms = int(await self._script(keys=[_PREFIX + bucket], args=[self.rate, self.burst]))
        except (redis.RedisError, OSError) as exc:
            if not self._degraded:
                log.warning("tavus rate limit: Redis unavailable (%s); limiting per process", exc)
                self._degraded = True
            return await super()._take(bucket)
        self._degraded = False
        return wait_ms / 1000.0


def make_limiter(rate: float, burst: int, client: redis.Redis | None) -> RateLimiter:
    """The shared limiter when a Redis client is given, else the process's own."""
    if client is not None:
        return RedisRateLimiter(client, rate, burst)
    return RateLimiter(rate, burst)


def seconds(value: float) -> int:
    """A wait as a whole `Retry-After` value (at least 1)."""
    return max(1, math.ceil(value))
