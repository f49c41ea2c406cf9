"""`GET /readyz`: whether this process can serve now — the database answers, and Redis when
it is configured — each part bounded by a short timeout, so a load balancer or an orchestrator
can take a process out of rotation while what it depends on is away. `/healthz` stays liveness
(the process answers at all).

The endpoint needs no key (probes send none), so a failing part is named with the kind of
failure only (`failing: ConnectionRefusedError`); the full cause, which may name internal hosts,
goes to the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from cvi_agent.bus import Bus, RedisBus
from cvi_agent.doctor.checks import cause_of
from cvi_agent.store import SqlStore

log = logging.getLogger(__name__)

#: Seconds each part may take to answer.
READY_TIMEOUT = 2.0


async def _part(name: str, step: Awaitable[object], within: float) -> str:
    try:
        await asyncio.wait_for(step, within)
    except Exception as exc:
        log.warning("readiness: %s failing (%s)", name, cause_of(exc))
        return f"failing: {type(exc).__name__}"
    return "ok"


async def readiness(
    store: SqlStore | None, bus: Bus | None, within: float = READY_TIMEOUT
) -> tuple[bool, dict[str, str]]:
    """(ready, each part's state): `ok`, `failing: <kind>`, or `not configured` (Redis);
    a process whose services have not started (or have stopped) is not ready."""
    if store is None:
        return False, {"database": "failing: the server is starting or stopping"}
    parts: dict[str, Awaitable[object]] = {"database": store.ping()}
    if isinstance(bus, RedisBus):
        parts["redis"] = bus.redis.ping()
    states = await asyncio.gather(*(_part(name, step, within) for name, step in parts.items()))
    found = dict(zip(parts, states, strict=True))
    found.setdefault("redis", "not configured")
    return all(state == "ok" for state in states), found
