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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, StatementError

from cvi_agent.store import EventRecord, SqlStore, ToolCallRecord, UtteranceRecord

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


def _bad_data(exc: BaseException) -> bool:
    """Errors that one record causes (retrying the same batch cannot help)."""
    if isinstance(exc, DataError | IntegrityError | ProgrammingError):
        return True
    return isinstance(exc, StatementError) and isinstance(exc.orig, TypeError | ValueError)


def scrub(value: Any) -> Any:
    """JSON-safe and PostgreSQL-safe: NUL characters removed, unknown types made strings."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {scrub(str(k)): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


class Recorder:
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
        self._queue: asyncio.Queue[Pending | _Flush | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._warned_at = 1000

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recorder")

    def put(self, item: Pending) -> None:
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
        """Write what is queued (bounded by `close_timeout`), then stop."""
        task = self._task
        if task is None or task.done():
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.close_timeout)
        except TimeoutError:
            lost = self._queue.qsize()
            self.dropped += lost
            log.error(
                "recorder: the database did not take %d queued records in %.0f s",
                lost,
                self.close_timeout,
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
                except asyncio.CancelledError:
                    raise
                except Exception:  # pragma: no cover - the recorder must outlive any bug
                    log.exception("recorder: writing a batch of %d failed", len(batch))
                    self.dropped += len(batch)
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
        delay = 0.1
        while True:
            try:
                return await self.store.add_events_bulk(records)
            except Exception as exc:
                if _bad_data(exc):
                    return await self._store_one_by_one(records)
                log.warning(
                    "recorder: database unavailable (%s); retrying %d records in %.1f s",
                    type(exc).__name__,
                    len(records),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _store_one_by_one(self, records: list[EventRecord]) -> list[EventRecord]:
        stored: list[EventRecord] = []
        for record in records:
            try:
                stored.extend(await self.store.add_events_bulk([record]))
                continue
            except Exception as exc:
                if not _bad_data(exc):
                    stored.extend(await self._store_events([record]))
                    continue
                first_error = exc
            record.payload = scrub(record.payload)
            try:
                stored.extend(await self.store.add_events_bulk([record]))
            except Exception:
                self.dropped += 1
                log.error(
                    "recorder: the database rejected a %s record (%s); dropped",
                    record.kind,
                    str(first_error).splitlines()[0][:200],
                )
        return stored

    async def _side_write(
        self, what: str, write: Callable[[Any], Awaitable[None]], arg: Any
    ) -> None:
        delay = 0.1
        for _ in range(5):
            try:
                await write(arg)
                return
            except Exception as exc:
                if _bad_data(exc):
                    log.error("recorder: the database rejected %s: %s", what, str(exc)[:200])
                    return
                log.warning("recorder: storing %s failed (%s); retrying", what, type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)
        log.error("recorder: gave up storing %s", what)
