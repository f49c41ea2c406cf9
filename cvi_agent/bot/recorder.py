"""The recorder: everything the bot hears and says goes to the store without ever blocking the
room. Callers `put()` (never awaits, never fails); one task drains the queue in batches, orders
each batch by `seq`, writes it in one transaction, applies the utterance and tool-call side
writes of the records that were new, then calls `on_record` for each of them in order.

A database that is down is waited out (with backoff), not dropped; a record the database rejects
(bad data) is isolated from its batch, scrubbed once, and only then dropped with an error log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as SqlTimeoutError

from cvi_agent.store import EventRecord, SqlStore, ToolCallRecord, UtteranceRecord
from cvi_agent.store.base import MAX_JSON_DEPTH, too_deep

log = logging.getLogger(__name__)

OnRecord = Callable[[EventRecord], Awaitable[None]]


@dataclass(slots=True)
class Pending:
    """One event to store, with what it implies for the utterance and tool-call tables."""

    event: EventRecord
    utterance: UtteranceRecord | None = None
    tool_call: ToolCallRecord | None = None


_Flush = asyncio.Future[None]


def order_by_seq(items: Sequence[Pending]) -> list[Pending]:
    """Sort the records that carry a `seq` among their own positions; the rest stay put."""
    slots = [i for i, p in enumerate(items) if p.event.seq is not None]
    ordered = list(items)
    by_seq = sorted((items[i] for i in slots), key=lambda p: p.event.seq or 0)
    for slot, item in zip(slots, by_seq, strict=True):
        ordered[slot] = item
    return ordered


# SQLSTATE classes that one record causes: data exception, integrity, syntax/access rule.
_DATA_SQLSTATES = ("22", "23", "42")


def classify(exc: BaseException) -> str:
    """`data` (this record is the problem: retrying cannot help), `transient` (the database is
    busy or away: wait), or `unknown`."""
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return "data" if sqlstate[:2] in _DATA_SQLSTATES else "transient"
    if isinstance(exc, DataError | IntegrityError | ProgrammingError):
        return "data"
    if isinstance(
        exc, OperationalError | InterfaceError | SqlTimeoutError | OSError | TimeoutError
    ):
        return "transient"
    if isinstance(exc, StatementError) and isinstance(exc.orig, TypeError | ValueError):
        return "data"  # not serializable
    return "unknown"


def scrub(value: Any, depth: int = 1) -> Any:
    """JSON-safe and PostgreSQL-safe: NUL characters removed, unknown types made strings, and
    so are infinities and NaN (Python writes them as `Infinity`, which is not JSON). A room
    message is the room's to parse, however deep it nests: what lies deeper than
    `MAX_JSON_DEPTH` levels is replaced by `TOO_DEEP`, so the record always reads back."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict | list | tuple) and depth > MAX_JSON_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {scrub(str(k)): scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


#: What stands in a stored payload for a value nested deeper than `MAX_JSON_DEPTH`.
TOO_DEEP = f"(nested deeper than {MAX_JSON_DEPTH} levels: not stored)"


def scrub_record(record: EventRecord) -> None:
    """`scrub` every text column too: a NUL in an id a room event carried (its
    `inference_id`, in the dedupe key) is refused by PostgreSQL as much as one in the payload."""
    record.payload = scrub(record.payload)
    for name in ("conversation_id", "kind", "dedupe_key", "inference_id", "role"):
        value = getattr(record, name)
        if isinstance(value, str) and "\x00" in value:
            setattr(record, name, value.replace("\x00", ""))


class _Backoff:
    """Retry policy for one write: wait out a busy or absent database (for as long as it takes),
    give an unexplained error three tries, and never retry what the data itself caused."""

    def __init__(self, cap: float) -> None:
        self.delay = 0.1
        self.cap = cap
        self.unknown = 0

    async def wait(self, exc: Exception, count: int) -> bool:
        """Sleep and return True if the write is worth retrying."""
        kind = classify(exc)
        if kind == "unknown":
            self.unknown += 1
        if kind == "data" or self.unknown > 3:
            return False
        log.warning(
            "recorder: database unavailable (%s); retrying %d record(s) in %.1f s",
            type(exc).__name__,
            count,
            self.delay,
        )
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)
        return True


class Recorder:
    """The queue between a room and the store (see the module doc), drained by one task.

    The queue is unbounded on purpose: a room callback must never wait or fail, so a database
    that is away makes the backlog grow (logged at 1,000, 4,000, 16,000… records) rather than
    push back on the room. One per bot by default; several bots may share one, and then
    whoever created it starts and closes it.

    Args:
        store: where the records go (`add_events`, then the utterance and tool-call rows).
        on_record: awaited with each newly stored record, in order, after its batch committed
            (the worker publishes it on the live feed); its errors are logged, not raised.
        max_batch: records written per transaction at most.
        linger: seconds the drain task waits after a lone record so a burst (and out-of-order
            deliveries) share one batch; 0 writes at once.
        retry_max: cap, in seconds, of the backoff between retries of a failed write.
        close_timeout: seconds `close()` waits without any progress of the database before it
            gives up and counts what is left as dropped.
    """

    def __init__(
        self,
        store: SqlStore,
        *,
        on_record: OnRecord | None = None,
        max_batch: int = 500,
        linger: float = 0.02,
        retry_max: float = 5.0,
        close_timeout: float = 15.0,
    ) -> None:
        self.store = store
        self.on_record = on_record
        self.max_batch = max_batch
        self.linger = linger
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        self.stored = 0
        self.duplicates = 0
        self.dropped = 0
        self.batches = 0
        self._unwritten = 0  # put but not yet written (or given up on)
        self._queue: asyncio.Queue[Pending | _Flush | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._warned_at = 1000

    @property
    def backlog(self) -> int:
        """Items waiting in the queue (not counting the batch being written)."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the drain task (idempotent); items put before this wait in the queue."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recorder")

    def put(self, item: Pending) -> None:
        """Queue one record for the store; never awaits, never raises (room callbacks call it).
        A payload nested past `MAX_JSON_DEPTH` is cut to it first (`scrub`): stored as is, it
        would be accepted by the database and unreadable through the API from then on."""
        if too_deep(item.event.payload):
            item.event.payload = scrub(item.event.payload)
        self._unwritten += 1
        self._queue.put_nowait(item)
        size = self._queue.qsize()
        if size >= self._warned_at:
            log.warning("recorder backlog: %d records wait for the database", size)
            self._warned_at *= 4

    async def flush(self) -> None:
        """Wait until everything put so far is written (or given up on)."""
        if self._task is None or self._task.done():
            return
        marker: _Flush = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(marker)
        await asyncio.shield(marker)

    async def close(self) -> None:
        """Write what is queued, then stop. Waits as long as batches keep getting written; gives
        up (and counts the rest as dropped) once nothing was written for `close_timeout`.

        Progress is the database's, not only this recorder's: many bots share one connection
        pool, and a recorder that waits its turn behind the others is slow, not stuck (measured:
        100 bots stopping at once on SQLite starved some recorders for more than 15 s). And
        only the time the event loop was free to move counts: every database call comes back
        through the loop, so while the loop is flooded (100 bots each hearing 1,000 events at
        once: turns of the loop 1-4 s long) a write that needs a few of its turns takes tens of
        seconds without the database being at fault."""
        task = self._task
        if task is None or task.done():
            return
        self._queue.put_nowait(None)
        loop = asyncio.get_running_loop()
        step = min(0.25, self.close_timeout / 4)
        progress = (self.batches, self.store.commits)
        still = 0.0  # loop time, counted at most `step` a wait, without any progress
        while True:
            started = loop.time()
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return
            now = (self.batches, self.store.commits)
            if now != progress:
                progress, still = now, 0.0  # slow but moving: keep draining
                continue
            still += min(loop.time() - started, step)
            if still < self.close_timeout:
                continue
            lost = self._unwritten
            self.dropped += lost
            log.error(
                "recorder: the database took nothing for %g s; %d queued records dropped",
                self.close_timeout,
                lost,
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            while not self._queue.empty():  # nobody waits for a flush that cannot happen
                item = self._queue.get_nowait()
                if isinstance(item, asyncio.Future) and not item.done():
                    item.set_result(None)
            return

    async def _run(self) -> None:
        queue = self._queue
        closing = False
        while not closing:
            first = await queue.get()
            batch: list[Pending] = []
            markers: list[_Flush] = []
            if first is None:
                closing = True
            elif isinstance(first, asyncio.Future):
                markers.append(first)
            else:
                batch.append(first)
                if self.linger > 0 and queue.empty():
                    # A short hold lets a burst (and out-of-order deliveries) share one batch.
                    await asyncio.sleep(self.linger)
            while len(batch) < self.max_batch and not queue.empty() and not closing:
                item = queue.get_nowait()
                if item is None:
                    closing = True
                elif isinstance(item, asyncio.Future):
                    markers.append(item)
                    break  # everything before the marker is in this batch
                else:
                    batch.append(item)
            if batch:
                try:
                    await self._write(batch)
                    self.batches += 1
                except asyncio.CancelledError:
                    raise
                except Exception:  # pragma: no cover - the recorder must outlive any bug
                    log.exception("recorder: writing a batch of %d failed", len(batch))
                    self.dropped += len(batch)
                self._unwritten -= len(batch)
            for marker in markers:
                if not marker.done():
                    marker.set_result(None)

    async def _write(self, batch: list[Pending]) -> None:
        ordered = order_by_seq(batch)
        new = await self._store_events([p.event for p in ordered])
        self.stored += len(new)
        self.duplicates += len(ordered) - len(new)
        fresh = {id(r) for r in new}
        utterances = [
            p.utterance for p in ordered if p.utterance is not None and id(p.event) in fresh
        ]
        tool_calls = [
            p.tool_call for p in ordered if p.tool_call is not None and id(p.event) in fresh
        ]
        if utterances:
            await self._side_write("utterances", self.store.upsert_utterances, utterances)
        for call in tool_calls:
            await self._side_write("tool call", self.store.upsert_tool_call, call)
        if self.on_record is not None:
            for record in new:
                try:
                    await self.on_record(record)
                except Exception:
                    log.exception("on_record hook failed for %s", record.kind)

    async def _store_events(self, records: list[EventRecord]) -> list[EventRecord]:
        """Store a batch, waiting out an unavailable database; isolate records it rejects."""
        retry = _Backoff(self.retry_max)
        while True:
            try:
                return await self.store.add_events(records)
            except Exception as exc:
                if not await retry.wait(exc, len(records)):
                    break
        stored: list[EventRecord] = []
        for record in records:
            stored.extend(await self._store_one(record))
        return stored

    async def _store_one(self, record: EventRecord) -> list[EventRecord]:
        retry = _Backoff(self.retry_max)
        scrubbed = False
        while True:
            try:
                return await self.store.add_events([record])
            except Exception as exc:
                if await retry.wait(exc, 1):
                    continue
                if not scrubbed:
                    scrub_record(record)  # NULs, values that are not JSON
                    scrubbed = True
                    continue
                self.dropped += 1
                log.error(
                    "recorder: the database rejected a %s record (%s); dropped",
                    record.kind,
                    str(exc).splitlines()[0][:200],
                )
                return []

    async def _side_write(
        self, what: str, write: Callable[[Any], Awaitable[None]], arg: Any
    ) -> None:
        retry = _Backoff(self.retry_max)
        while True:
            try:
                await write(arg)
                return
            except Exception as exc:
                if not await retry.wait(exc, 1):
                    log.error("recorder: the database rejected %s: %s", what, str(exc)[:200])
                    return
