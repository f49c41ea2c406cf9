"""Persistence: one schema on SQLite (default, WAL) or PostgreSQL, via SQLAlchemy async."""

from cvi_agent.store.base import (
    ConversationRecord,
    EventRecord,
    ToolCallRecord,
    UtteranceRecord,
    VideoRecord,
)
from cvi_agent.store.leases import Lease, Leases
from cvi_agent.store.sql import SqlStore, open_store

__all__ = [
    "ConversationRecord",
    "EventRecord",
    "Lease",
    "Leases",
    "SqlStore",
    "ToolCallRecord",
    "UtteranceRecord",
    "VideoRecord",
    "open_store",
]
