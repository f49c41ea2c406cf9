"""The SQL store: SQLAlchemy Core on an async engine. SQLite (WAL) by default, PostgreSQL by URL.

Idempotency lives in unique constraints, not in application checks: a duplicate delivery is an
`INSERT … ON CONFLICT DO NOTHING` that inserts nothing. The tables and their migrations are in
`store.schema`; which errors are retried is decided in `store.errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cvi_agent.store.base import (
    ConversationRecord,
    EventRecord,
    ToolCallRecord,
    UtteranceRecord,
    VideoRecord,
    now,
)
from cvi_agent.store.errors import describe_error, is_transient
from cvi_agent.store.schema import (
    answers,
    applied_version,
    conversations,
    events,
    migrate,
    tool_calls,
    transcripts,
    utterances,
    videos,
)

log = logging.getLogger(__name__)

# Seconds a write keeps retrying while the database is away before its caller gets the error
# (a callback then answers 503): long enough to ride out a PostgreSQL restart, short enough
# that no request hangs.
RETRY_BUDGET = 3.0

_VIDEO_RANK = {"queued": 0, "rendering": 1, "ready": 2, "failed": 2}
# The most rows one multi-row INSERT of events carries (`SqlStore.add_events`): above the room
# bot's batches (500), within both databases' limits on parameters (11 a row).
_EVENT_PAGE = 512


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return Path(parsed.database)


class SqlStore:
    """Every read and write of the conversation record, in one place, so that idempotency,
    retries while the database is away, and SQLite's one-writer rule are handled once rather
    than by each caller."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        """Prepare the engine (nothing connects yet; `init()` creates or migrates the schema).

        `url` is an SQLAlchemy async URL (`sqlite+aiosqlite:///…`, `postgresql+asyncpg://…`);
        `echo` logs every statement, for debugging.
        """
        self.url = url
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.dialect = make_url(url).get_backend_name()
        # Transactions committed through `_retrying` (a sign of life for waiting writers).
        self.commits = 0
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": self.dialect != "sqlite"}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # asyncpg waits 60 s for a connection by default; a database that does not answer
            # should fail the attempt (and let `_retrying` decide) well before a request times out.
            kwargs.update(pool_size=10, max_overflow=20, connect_args={"timeout": 5})
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        # SQLite has one writer at a time. Left to its busy handler, concurrent write
        # transactions of this process each hold a pooled connection and poll the lock with
        # sleeps growing to 100 ms while the holder waits for the event loop: under load a
        # callback took seconds. So this process queues its write transactions itself (FIFO,
        # handed over at once); the busy handler is left to arbitrate between processes.
        self._write_lock: asyncio.Lock | None = None
        self._write_lock_loop: asyncio.AbstractEventLoop | None = None

    async def init(self) -> None:
        """Create or migrate the schema (idempotent, safe to run from several processes)."""
        async with self.engine.begin() as conn:
            await migrate(conn, self.dialect)

    async def schema_version(self) -> int:
        """The schema version the database is at (0 before `init`): proof that migrations ran."""
        async with self.engine.connect() as conn:
            return await applied_version(conn)

    async def ping(self) -> None:
        """One round trip to the database (`GET /readyz`); raises what went wrong."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def aclose(self) -> None:
        """Close the pooled connections, so a test or a command leaves no connection behind."""
        await self.engine.dispose()

    # -- helpers -------------------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _writer_lock(self) -> asyncio.Lock | None:
        """SQLite only: the lock serializing this process's write transactions (per loop)."""
        if self.dialect != "sqlite":
            return None
        loop = asyncio.get_running_loop()
        if self._write_lock is None or self._write_lock_loop is not loop:
            self._write_lock = asyncio.Lock()
            self._write_lock_loop = loop
        return self._write_lock

    async def _retrying(
        self, fn: Callable[[AsyncConnection], Awaitable[Any]], budget: float | None = None
    ) -> Any:
        """Run `fn` in a transaction, retrying (in a new transaction) while the database is
        briefly unavailable: locked, restarting, or the connection was lost. Gives up after
        `budget` seconds (default `RETRY_BUDGET`) and raises the last error.

        A retried `fn` may run again after a commit whose answer was lost with the connection;
        every write here is idempotent (`ON CONFLICT`, conditional updates), so that is safe."""
        delay = 0.05
        deadline = time.monotonic() + (RETRY_BUDGET if budget is None else budget)
        lock = self._writer_lock()
        while True:
            try:
                if lock is None:
                    async with self.engine.begin() as conn:
                        result = await fn(conn)
                else:
                    async with lock, self.engine.begin() as conn:
                        result = await fn(conn)
                self.commits += 1
                return result
            except (DBAPIError, OSError) as exc:
                # OSError: asyncpg's connect raises refused/reset/timeout unwrapped.
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("database busy or unavailable (%s); retrying", describe_error(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _write(
        self, fn: Callable[[AsyncConnection], Awaitable[Any]], conn: AsyncConnection | None
    ) -> Any:
        """`fn` in its own retried transaction, or inside the caller's (`conn`, see
        `transaction`): several writes then cost one lock hand-over and one commit."""
        if conn is not None:
            return await fn(conn)
        return await self._retrying(fn)

    async def transaction(self, fn: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        """Run `fn(conn)` in one write transaction, retried as a whole while the database is
        briefly unavailable (so everything `fn` writes must be idempotent). Pass `conn` on to
        the write methods that take it to make them part of it."""
        return await self._retrying(fn)

    # -- conversations -------------------------------------------------------------------------

    async def upsert_conversation(
        self, conversation_id: str, *, conn: AsyncConnection | None = None, **fields: Any
    ) -> None:
        """Create the conversation if new; otherwise update the given non-None fields."""
        values = {k: v for k, v in fields.items() if v is not None}
        meta = values.pop("meta", None)
        ts = now()

        async def run(conn: AsyncConnection) -> None:
            row = (
                await conn.execute(
                    sa.select(conversations.c.meta)
                    .where(conversations.c.id == conversation_id)
                    .with_for_update()  # merging meta: no lost update between processes
                )
            ).first()
            if row is None:
                stmt = self._insert(conversations).values(
                    id=conversation_id,
                    meta=meta or {},
                    created_at=ts,
                    updated_at=ts,
                    **{"status": "active", **values},
                )
                await conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
                return
            update: dict[str, Any] = dict(values, updated_at=ts)
            if meta:
                update["meta"] = {**(row.meta or {}), **meta}
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation_id).values(**update)
            )

        await self._write(run, conn)

    async def ensure_conversations(
        self, personas: dict[str, str | None], *, conn: AsyncConnection | None = None
    ) -> None:
        """Create the conversations not known yet ({id: persona}); never touches existing ones.
        One statement with a parameter set per conversation (one round trip, however many)."""
        if not personas:
            return
        ts = now()
        rows: list[dict[str, Any]] = [
            {
                "id": conversation_id,
                "persona": persona,
                "meta": {},
                "created_at": ts,
                "updated_at": ts,
                "status": "active",
            }
            for conversation_id, persona in personas.items()
        ]
        stmt = self._insert(conversations).on_conflict_do_nothing(index_elements=["id"])

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(stmt, rows)

        await self._write(run, conn)

    async def set_conversation_status(
        self,
        conversation_id: str,
        status: str,
        *,
        unless: tuple[str, ...] = (),
        shutdown_reason: str | None = None,
        ended_at: float | None = None,
        meta: dict[str, Any] | None = None,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Set the status (creating the conversation if new) unless it is one of `unless`.

        A conditional UPDATE, so concurrent, out-of-order deliveries (`replica_joined` after
        `shutdown`) never move an ended conversation back to live. Returns whether it changed.
        """
        ts = now()

        async def run(conn: AsyncConnection) -> bool:
            await conn.execute(
                self._insert(conversations)
                .values(id=conversation_id, meta={}, created_at=ts, updated_at=ts, status="active")
                .on_conflict_do_nothing(index_elements=["id"])
            )
            values: dict[str, Any] = {"status": status, "updated_at": ts}
            if shutdown_reason is not None:
                values["shutdown_reason"] = shutdown_reason
            if ended_at is not None:
                values["ended_at"] = sa.func.coalesce(conversations.c.ended_at, ended_at)
            stmt = conversations.update().where(conversations.c.id == conversation_id)
            if unless:
                stmt = stmt.where(conversations.c.status.not_in(list(unless)))
            changed = bool((await conn.execute(stmt.values(**values))).rowcount)
            if changed and meta:
                row = (
                    await conn.execute(
                        sa.select(conversations.c.meta)
                        .where(conversations.c.id == conversation_id)
                        .with_for_update()
                    )
                ).first()
                merged = {**((row.meta if row is not None else None) or {}), **meta}
                await conn.execute(
                    conversations.update()
                    .where(conversations.c.id == conversation_id)
                    .values(meta=merged)
                )
            return changed

        changed: bool = await self._write(run, conn)
        return changed

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The conversation, or None when nothing about it was ever recorded."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(conversations).where(conversations.c.id == conversation_id)
                )
            ).first()
        return _from_row(ConversationRecord, row) if row is not None else None

    async def list_conversations(
        self, limit: int = 50, before: float | None = None, before_id: str | None = None
    ) -> list[ConversationRecord]:
        """Newest first. `before`/`before_id` is a keyset cursor: the last row of a page."""
        query = sa.select(conversations).order_by(
            conversations.c.created_at.desc(), conversations.c.id.desc()
        )
        if before is not None and before_id is not None:
            query = query.where(
                (conversations.c.created_at < before)
                | ((conversations.c.created_at == before) & (conversations.c.id < before_id))
            )
        elif before is not None:
            query = query.where(conversations.c.created_at < before)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        return [_from_row(ConversationRecord, r) for r in rows]

    async def last_event_times(self, conversation_ids: Sequence[str]) -> dict[str, float]:
        """When each conversation's latest event arrived (a conversation without events is
        missing): what tells a live conversation from one nobody has heard of for a while.
        One query; the latest event is found by the (conversation, id) index."""
        if not conversation_ids:
            return {}
        latest = (
            sa.select(sa.func.max(events.c.id))
            .where(events.c.conversation_id.in_(list(conversation_ids)))
            .group_by(events.c.conversation_id)
        )
        query = sa.select(events.c.conversation_id, events.c.received_at).where(
            events.c.id.in_(latest)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {row.conversation_id: row.received_at for row in rows}

    # -- events --------------------------------------------------------------------------------

    async def add_events(
        self, records: Sequence[EventRecord], *, conn: AsyncConnection | None = None
    ) -> list[EventRecord]:
        """Store a batch; returns the records that were new, in input order, with `id` set
        (duplicates, stored before or repeated in the batch, are absorbed). One cached
        statement executed with every row: SQLAlchemy's "insertmanyvalues" sends multi-row
        INSERT … RETURNING batches, one round trip for a turn recorder's or a bot's batch."""
        unique: dict[tuple[str, str], EventRecord] = {}
        for record in records:
            unique.setdefault((record.source, record.dedupe_key), record)
        if not unique:
            return []
        rows = [
            {
                "conversation_id": r.conversation_id,
                "source": r.source,
                "kind": r.kind,
                "dedupe_key": r.dedupe_key,
                "seq": r.seq,
                "inference_id": r.inference_id,
                "turn_idx": r.turn_idx,
                "role": r.role,
                "occurred_at": r.occurred_at,
                "received_at": r.received_at,
                "payload": r.payload,
            }
            for r in unique.values()
        ]
        stmt = (
            self._insert(events)
            .on_conflict_do_nothing(index_elements=["source", "dedupe_key"])
            .returning(events.c.id, events.c.source, events.c.dedupe_key)
        )

        async def run(conn: AsyncConnection) -> dict[tuple[str, str], int]:
            ids: dict[tuple[str, str], int] = {}
            for start in range(0, len(rows), _EVENT_PAGE):
                page = rows[start : start + _EVENT_PAGE]
                # Padded to a power of two rows with copies of its last row (a copy is a
                # conflict, skipped): the driver prepares and caches a statement per row count,
                # so a statement per batch size grew the RSS by ~9 MB over sizes 1-100; padded,
                # any size is one of ten statements, and still one round trip.
                page += [page[-1]] * ((1 << (len(page) - 1).bit_length()) - len(page))
                result = await conn.execute(stmt, page)
                ids.update({(row.source, row.dedupe_key): int(row.id) for row in result.all()})
            return ids

        found: dict[tuple[str, str], int] = await self._write(run, conn)
        inserted: list[EventRecord] = []
        for key, record in unique.items():
            new_id = found.get(key)
            if new_id is not None:
                record.id = new_id
                inserted.append(record)
        return inserted

    async def add_event(self, record: EventRecord) -> bool:
        """`add_events` for one record: whether it was new (False: a duplicate delivery)."""
        return bool(await self.add_events([record]))

    async def list_events(
        self,
        conversation_id: str,
        *,
        after_id: int = 0,
        limit: int = 1000,
        source: str | None = None,
        order: str = "seq",
    ) -> list[EventRecord]:
        """A page of a conversation's events after `after_id`. `order="seq"` is the order they
        happened in (room events by `seq`, the rest by time), for reading a conversation;
        `order="id"` is the order they were stored in, for following new ones with `after_id`."""
        query = sa.select(events).where(
            events.c.conversation_id == conversation_id, events.c.id > after_id
        )
        if source is not None:
            query = query.where(events.c.source == source)
        if order == "seq":
            # Room events carry `seq`; everything else falls back to arrival order.
            query = query.order_by(
                sa.func.coalesce(events.c.occurred_at, events.c.received_at),
                events.c.seq,
                events.c.id,
            )
        else:
            query = query.order_by(events.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit))).all()
        return [_from_row(EventRecord, r) for r in rows]

    async def find_event(self, source: str, dedupe_key: str) -> EventRecord | None:
        """The event stored for one delivery (`source`, `dedupe_key`), if any: how a repeated
        request (the same `Idempotency-Key`) learns what the first one did."""
        query = sa.select(events).where(
            events.c.source == source, events.c.dedupe_key == dedupe_key
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query.limit(1))).first()
        return _from_row(EventRecord, row) if row is not None else None

    async def count_events(
        self, conversation_id: str | None = None, source: str | None = None
    ) -> int:
        """How many events are stored (of one conversation, of one source), for stats and
        tests without reading them all."""
        query = sa.select(sa.func.count()).select_from(events)
        if conversation_id is not None:
            query = query.where(events.c.conversation_id == conversation_id)
        if source is not None:
            query = query.where(events.c.source == source)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar() or 0)

    async def max_seq(self, conversation_id: str, source: str = "room") -> int | None:
        """The highest `seq` stored for the conversation (None: no numbered event yet)."""
        query = sa.select(sa.func.max(events.c.seq)).where(
            events.c.conversation_id == conversation_id, events.c.source == source
        )
        async with self.engine.connect() as conn:
            value = (await conn.execute(query)).scalar()
        return int(value) if value is not None else None

    # -- utterances and tool calls ----------------------------------------------------------------

    async def upsert_utterances(self, records: Sequence[UtteranceRecord]) -> None:
        """Store turns, merging halves of the same turn (`conversation_id`, `role`, `key`):
        what was meant and what was spoken arrive in separate events, in any order, and each
        fills its own columns without erasing the other's."""
        if not records:
            return
        rows = [
            {
                "conversation_id": r.conversation_id,
                "role": r.role,
                "key": r.key,
                "intended_text": r.intended_text,
                "spoken_text": r.spoken_text,
                "is_interrupted": r.is_interrupted,
                "inference_id": r.inference_id,
                "turn_idx": r.turn_idx,
                "seq": r.seq,
                "occurred_at": r.occurred_at,
            }
            for r in records
        ]
        stmt = self._insert(utterances)
        excluded = stmt.excluded
        update = {
            name: sa.func.coalesce(getattr(excluded, name), getattr(utterances.c, name))
            for name in (
                "intended_text",
                "spoken_text",
                "is_interrupted",
                "inference_id",
                "turn_idx",
            )
        }
        # Keep the earliest seq/time of the turn so ordering reflects when it started.
        update["seq"] = sa.func.coalesce(utterances.c.seq, excluded.seq)
        update["occurred_at"] = sa.func.coalesce(utterances.c.occurred_at, excluded.occurred_at)
        # One statement, many parameter sets (applied in order, so rows for the same turn merge).
        stmt = stmt.on_conflict_do_update(
            index_elements=["conversation_id", "role", "key"], set_=update
        )

        async def run(conn: AsyncConnection) -> None:
            await conn.execute(stmt, rows)

        await self._retrying(run)

    async def list_utterances(self, conversation_id: str) -> list[UtteranceRecord]:
        """The conversation's turns in the order they started: its transcript as we saw it."""
        query = (
            sa.select(utterances)
            .where(utterances.c.conversation_id == conversation_id)
            .order_by(
                sa.func.coalesce(utterances.c.seq, 0), utterances.c.occurred_at, utterances.c.id
            )
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_from_row(UtteranceRecord, r) for r in rows]

    async def upsert_tool_call(self, record: ToolCallRecord) -> None:
        """Record a tool call, or its outcome: a repeated "called" never overwrites an outcome
        already stored, and a result updates the call it belongs to."""

        async def run(conn: AsyncConnection) -> None:
            stmt = self._insert(tool_calls).values(
                conversation_id=record.conversation_id,
                key=record.key,
                tool_call_id=record.tool_call_id,
                name=record.name,
                arguments=record.arguments,
                inference_id=record.inference_id,
                status=record.status,
                output=record.output,
                occurred_at=record.occurred_at,
            )
            update: dict[str, Any] = {}
            if record.status != "called":
                update = {"status": record.status, "output": record.output}
            if update:
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["conversation_id", "key"], set_=update
                    )
                )
            else:
                await conn.execute(
                    stmt.on_conflict_do_nothing(index_elements=["conversation_id", "key"])
                )

        await self._retrying(run)

    async def list_tool_calls(self, conversation_id: str) -> list[ToolCallRecord]:
        """The conversation's tool calls in the order they were first recorded."""
        query = (
            sa.select(tool_calls)
            .where(tool_calls.c.conversation_id == conversation_id)
            .order_by(tool_calls.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_from_row(ToolCallRecord, r) for r in rows]

    # -- transcripts and answers ---------------------------------------------------------------

    async def set_transcript(
        self,
        conversation_id: str,
        entries: list[dict[str, Any]],
        *,
        conn: AsyncConnection | None = None,
    ) -> None:
        """Keep Tavus's transcript of the conversation; a later delivery replaces it whole."""

        async def run(conn: AsyncConnection) -> None:
            stmt = self._insert(transcripts).values(
                conversation_id=conversation_id, entries=entries, received_at=now()
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["conversation_id"],
                    set_={
                        "entries": stmt.excluded.entries,
                        "received_at": stmt.excluded.received_at,
                    },
                )
            )

        await self._write(run, conn)

    async def get_transcript(self, conversation_id: str) -> list[dict[str, Any]] | None:
        """Tavus's transcript, or None until it was delivered."""
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(
                    sa.select(transcripts.c.entries).where(
                        transcripts.c.conversation_id == conversation_id
                    )
                )
            ).scalar()
        return list(value) if value is not None else None

    async def set_answers(
        self, conversation_id: str, values: dict[str, str], *, conn: AsyncConnection | None = None
    ) -> None:
        """Store questionnaire answers by question id; a newer answer replaces the older one,
        the other questions keep theirs."""
        if not values:
            return

        async def run(conn: AsyncConnection) -> None:
            for question_id, answer in values.items():
                stmt = self._insert(answers).values(
                    conversation_id=conversation_id,
                    question_id=question_id,
                    answer=answer,
                    updated_at=now(),
                )
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["conversation_id", "question_id"],
                        set_={
                            "answer": stmt.excluded.answer,
                            "updated_at": stmt.excluded.updated_at,
                        },
                    )
                )

        await self._write(run, conn)

    async def get_answers(self, conversation_id: str) -> dict[str, str]:
        """The questionnaire answers so far, by question id."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(answers).where(answers.c.conversation_id == conversation_id)
                )
            ).all()
        return {r.question_id: r.answer for r in rows}

    # -- videos --------------------------------------------------------------------------------

    async def upsert_video(self, record: VideoRecord) -> VideoRecord:
        """Insert or advance a video; a late, older status never overwrites a newer one."""

        async def run(conn: AsyncConnection) -> VideoRecord:
            key = (videos.c.provider == record.provider) & (videos.c.video_id == record.video_id)
            row = (await conn.execute(sa.select(videos).where(key).with_for_update())).first()
            if row is None:
                stmt = self._insert(videos).values(
                    provider=record.provider,
                    video_id=record.video_id,
                    conversation_id=record.conversation_id,
                    status=record.status,
                    url=record.url,
                    error=record.error,
                    script=record.script,
                    raw=record.raw,
                    created_at=record.created_at,
                    updated_at=record.updated_at,
                )
                await conn.execute(
                    stmt.on_conflict_do_nothing(index_elements=["provider", "video_id"])
                )
                return record
            current = _from_row(VideoRecord, row)
            incoming = record
            if _VIDEO_RANK.get(incoming.status, 0) < _VIDEO_RANK.get(current.status, 0):
                incoming = current
            merged = VideoRecord(
                provider=current.provider,
                video_id=current.video_id,
                status=incoming.status,
                conversation_id=incoming.conversation_id or current.conversation_id,
                url=incoming.url or current.url,
                error=incoming.error or current.error,
                script=current.script or incoming.script,
                raw={**current.raw, **incoming.raw},
                created_at=current.created_at,
                updated_at=now(),
            )
            await conn.execute(
                videos.update()
                .where(key)
                .values(
                    status=merged.status,
                    conversation_id=merged.conversation_id,
                    url=merged.url,
                    error=merged.error,
                    script=merged.script,
                    raw=merged.raw,
                    updated_at=merged.updated_at,
                )
            )
            return merged

        result: VideoRecord = await self._retrying(run)
        return result

    async def get_video(self, provider: str, video_id: str) -> VideoRecord | None:
        """One video by its provider's id, or None when we never heard of it."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(videos).where(
                        (videos.c.provider == provider) & (videos.c.video_id == video_id)
                    )
                )
            ).first()
        return _from_row(VideoRecord, row) if row is not None else None

    async def list_videos(
        self,
        conversation_id: str | None = None,
        limit: int = 100,
        *,
        provider: str | None = None,
        statuses: Sequence[str] | None = None,
    ) -> list[VideoRecord]:
        """Videos newest first, optionally of one conversation, one provider, or in some
        statuses (the poller asks for the ones still rendering)."""
        query = sa.select(videos).order_by(videos.c.created_at.desc()).limit(limit)
        if conversation_id is not None:
            query = query.where(videos.c.conversation_id == conversation_id)
        if provider is not None:
            query = query.where(videos.c.provider == provider)
        if statuses is not None:
            query = query.where(videos.c.status.in_(list(statuses)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_from_row(VideoRecord, r) for r in rows]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


_Record = TypeVar(
    "_Record", ConversationRecord, EventRecord, UtteranceRecord, ToolCallRecord, VideoRecord
)


# (name, is a JSON object) of each field of each record dataclass: the fields name the columns.
_RECORD_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {
    cls: tuple((f.name, f.default_factory is dict) for f in dataclasses.fields(cls))
    for cls in (ConversationRecord, EventRecord, UtteranceRecord, ToolCallRecord, VideoRecord)
}


def _from_row(cls: type[_Record], row: Any) -> _Record:
    """A record from a row of its table; JSON objects are copied, and a NULL one is empty."""
    values = row._mapping
    kwargs: dict[str, Any] = {
        name: dict(values[name] or {}) if is_object else values[name]
        for name, is_object in _RECORD_FIELDS[cls]
    }
    return cls(**kwargs)


async def open_store(url: str) -> SqlStore:
    """A store ready to use: the schema created or migrated. What servers, workers and
    commands call; close it with `aclose()`."""
    store = SqlStore(url)
    await store.init()
    return store
