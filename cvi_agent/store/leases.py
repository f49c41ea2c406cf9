"""Leases: which worker runs the bot of which conversation (the `leases` table).

One row per conversation that wants a bot. A worker *claims* a row whose lease has expired (or
was never taken), keeps it by *renewing* it (heartbeats), and *finishes* it (deletes the row)
when the bot is done. A worker that dies stops renewing; once `expires_at` passes, another
worker claims the row and starts a new bot: one bot per conversation, with takeover.

Every claim gets a fresh owner token (`<worker>/<random>`), which doubles as a fencing token:
a worker that paused past its lease finds its token gone on the next heartbeat and stops its
bot instead of fighting the new owner.

PostgreSQL claims with `SELECT … FOR UPDATE SKIP LOCKED` so concurrent workers never wait on
each other; SQLite runs the same single-statement compare-and-set under its write lock.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from cvi_agent.store.base import now
from cvi_agent.store.schema import leases
from cvi_agent.store.sql import SqlStore


@dataclass(slots=True)
class Lease:
    """One conversation's claim on a bot: who runs it (`owner`, None while unclaimed) and until
    when (`expires_at`, pushed forward by heartbeats). `payload` carries what the bot needs to
    start, so any worker can take it over."""

    conversation_id: str
    owner: str | None
    expires_at: float
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def held(self, at: float | None = None) -> bool:
        """Whether a worker currently holds it (owned and not expired)."""
        return self.owner is not None and self.expires_at > (now() if at is None else at)

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API sends about a conversation's bot (of the payload, only the attempts)."""
        return {
            "conversation_id": self.conversation_id,
            "owner": self.owner,
            "expires_at": self.expires_at,
            "held": self.held(),
            "attempts": int(self.payload.get("attempts", 0) or 0),
        }


def new_owner_token(worker_id: str) -> str:
    """A fresh token per claim, so a worker that lost its lease and claims it again is told apart
    from its former self (the token is the fencing token)."""
    return f"{worker_id[:100]}/{secrets.token_hex(6)}"


class Leases:
    """The `leases` table as operations (offer, claim, renew, release, finish), each one
    statement or one short transaction, so workers coordinate through the database alone
    (`store`, the one every process of the deployment shares)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    async def offer(self, conversation_id: str, payload: dict[str, Any]) -> None:
        """Ask for a bot. Idempotent; a lease a worker holds keeps its owner (payload updated)."""
        ts = now()

        async def run(conn: AsyncConnection) -> None:
            stmt = self.store._insert(leases).values(
                conversation_id=conversation_id,
                owner=None,
                expires_at=0.0,
                payload=payload,
                created_at=ts,
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["conversation_id"], set_={"payload": stmt.excluded.payload}
                )
            )

        await self.store._retrying(run)

    async def claim(self, worker_id: str, ttl: float, limit: int = 1) -> list[Lease]:
        """Take up to `limit` claimable leases (never taken, released, or expired)."""
        claimed: list[Lease] = []
        for _ in range(max(0, limit)):
            lease = await self._claim_one(new_owner_token(worker_id), ttl)
            if lease is None:
                break
            claimed.append(lease)
        return claimed

    async def _claim_one(self, owner: str, ttl: float) -> Lease | None:
        async def run(conn: AsyncConnection) -> Lease | None:
            ts = now()
            pick = (
                sa.select(leases.c.conversation_id)
                .where(leases.c.expires_at <= ts)
                .order_by(leases.c.expires_at, leases.c.created_at)
                .limit(1)
            )
            if self.store.dialect == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            stmt = (
                leases.update()
                .where(leases.c.conversation_id == pick.scalar_subquery())
                .where(leases.c.expires_at <= ts)
                .values(owner=owner, expires_at=ts + ttl)
                .returning(*leases.c)
            )
            row = (await conn.execute(stmt)).first()
            return _lease(row) if row is not None else None

        result: Lease | None = await self.store._retrying(run)
        return result

    async def renew(self, owners: Sequence[str], ttl: float) -> set[str]:
        """Extend the leases held under these owner tokens; returns the tokens still held."""
        if not owners:
            return set()

        async def run(conn: AsyncConnection) -> set[str]:
            ts = now()
            stmt = (
                leases.update()
                .where(leases.c.owner.in_(list(owners)))
                .values(expires_at=ts + ttl)
                .returning(leases.c.owner)
            )
            return {r.owner for r in (await conn.execute(stmt)).all()}

        result: set[str] = await self.store._retrying(run)
        return result

    async def release(
        self, owner: str, *, retry_in: float = 0.0, payload: dict[str, Any] | None = None
    ) -> bool:
        """Give a lease back so another worker (or this one, later) can claim it."""

        async def run(conn: AsyncConnection) -> bool:
            values: dict[str, Any] = {"owner": None, "expires_at": now() + retry_in}
            if payload is not None:
                values["payload"] = payload
            result = await conn.execute(
                leases.update().where(leases.c.owner == owner).values(**values)
            )
            return bool(result.rowcount)

        released: bool = await self.store._retrying(run)
        return released

    async def finish(
        self,
        conversation_id: str,
        owner: str | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Remove the lease: no bot is wanted any more. With `owner`, only if still held by it."""

        async def run(conn: AsyncConnection) -> bool:
            stmt = leases.delete().where(leases.c.conversation_id == conversation_id)
            if owner is not None:
                stmt = stmt.where(leases.c.owner == owner)
            return bool((await conn.execute(stmt)).rowcount)

        finished: bool = await self.store._write(run, conn)
        return finished

    async def get(self, conversation_id: str) -> Lease | None:
        """The conversation's lease, or None when no bot is wanted for it."""
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(leases).where(leases.c.conversation_id == conversation_id)
                )
            ).first()
        return _lease(row) if row is not None else None

    async def list(self, limit: int = 1000) -> list[Lease]:
        """Every lease, oldest first: which bots are wanted, and who runs them."""
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(sa.select(leases).order_by(leases.c.created_at).limit(limit))
            ).all()
        return [_lease(r) for r in rows]


def _lease(row: Any) -> Lease:
    return Lease(
        conversation_id=row.conversation_id,
        owner=row.owner,
        expires_at=row.expires_at,
        payload=dict(row.payload or {}),
        created_at=row.created_at,
    )
