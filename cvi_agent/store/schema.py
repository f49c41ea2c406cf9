"""The database schema: every table, and the migrations that bring a database to it.

One schema serves SQLite and PostgreSQL (JSON columns are JSONB on PostgreSQL). It is versioned
in `schema_version`; `migrate` runs on every startup and applies only what is missing,
serialized across processes (PostgreSQL advisory lock; SQLite's write lock taken first), so several
servers and workers may start at once against the same database.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from cvi_agent.store.base import now

log = logging.getLogger(__name__)

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
metadata = sa.MetaData()

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("persona", sa.String(128)),
    sa.Column("status", sa.String(32), nullable=False, default="active"),
    sa.Column("conversation_url", sa.Text),
    sa.Column("shutdown_reason", sa.Text),
    sa.Column("meta", JSONType, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("conversation_id", sa.String(128), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("kind", sa.String(128), nullable=False),
    sa.Column("dedupe_key", sa.String(512), nullable=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("inference_id", sa.String(128)),
    sa.Column("turn_idx", sa.Integer),
    sa.Column("role", sa.String(32)),
    sa.Column("occurred_at", sa.Double),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.UniqueConstraint("source", "dedupe_key", name="uq_events_delivery"),
    sa.Index("ix_events_conversation", "conversation_id", "id"),
)

utterances = sa.Table(
    "utterances",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("conversation_id", sa.String(128), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("key", sa.String(256), nullable=False),
    sa.Column("intended_text", sa.Text),
    sa.Column("spoken_text", sa.Text),
    sa.Column("is_interrupted", sa.Boolean),
    sa.Column("inference_id", sa.String(128)),
    sa.Column("turn_idx", sa.Integer),
    sa.Column("seq", sa.BigInteger),
    sa.Column("occurred_at", sa.Double),
    sa.UniqueConstraint("conversation_id", "role", "key", name="uq_utterances_turn"),
)

tool_calls = sa.Table(
    "tool_calls",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("conversation_id", sa.String(128), nullable=False),
    sa.Column("key", sa.String(256), nullable=False),
    sa.Column("tool_call_id", sa.String(128)),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("arguments", sa.Text, nullable=False),
    sa.Column("inference_id", sa.String(128)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("output", sa.Text),
    sa.Column("occurred_at", sa.Double),
    sa.UniqueConstraint("conversation_id", "key", name="uq_tool_calls_call"),
)

transcripts = sa.Table(
    "transcripts",
    metadata,
    sa.Column("conversation_id", sa.String(128), primary_key=True),
    sa.Column("entries", JSONType, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
)

answers = sa.Table(
    "answers",
    metadata,
    sa.Column("conversation_id", sa.String(128), primary_key=True),
    sa.Column("question_id", sa.String(128), primary_key=True),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

videos = sa.Table(
    "videos",
    metadata,
    sa.Column("provider", sa.String(16), primary_key=True),
    sa.Column("video_id", sa.String(128), primary_key=True),
    sa.Column("conversation_id", sa.String(128)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("url", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("script", sa.Text),
    sa.Column("raw", JSONType, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_videos_conversation", "conversation_id"),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("conversation_id", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(128)),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Double, nullable=False),
)

Migration = Callable[[AsyncConnection], Awaitable[None]]


async def _v1_initial(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.create_all)


# Append-only: a released migration is never edited; a schema change is a new entry.
MIGRATIONS: list[tuple[int, Migration]] = [(1, _v1_initial)]


async def applied_version(conn: AsyncConnection) -> int:
    """The newest migration applied (0 for a database never migrated, or a new one)."""
    value = (await conn.execute(sa.select(sa.func.max(schema_version.c.version)))).scalar()
    return int(value or 0)


async def migrate(conn: AsyncConnection, dialect: str) -> None:
    """Bring the database to the newest schema, inside the caller's transaction (on SQLite, its
    first statement): idempotent, and safe to run from several processes at once (the first
    applies, the others wait and then find nothing left to do)."""
    if dialect == "postgresql":
        # The number names the lock; any constant works as long as every process uses it.
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(74210331)"))
    elif dialect == "sqlite":
        # The sqlite3 driver opens no transaction before DDL or a SELECT, so without this each
        # step below commits on its own and two processes migrating a fresh file both create
        # the tables. BEGIN IMMEDIATE takes the write lock first; the others wait for it
        # (busy timeout) and then find nothing left to do.
        await conn.exec_driver_sql("BEGIN IMMEDIATE")
    await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
    current = await applied_version(conn)
    for version, step in MIGRATIONS:
        if version <= current:
            continue
        log.info("applying schema migration %d", version)
        await step(conn)
        await conn.execute(schema_version.insert().values(version=version, applied_at=now()))
