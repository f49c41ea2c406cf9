"""Turn recording, off the hot path: one `llm` event per turn (latency) and questionnaire answers.

Every turn with a conversation id is handed to `TurnRecorder` when its response ends: a
streamed one by the turn tracker's observer (`TurnRecorder.observe`), a
non-streamed one by `observe_completion`. The recorder is a bounded in-process queue drained
by one background task that writes in batches. Nothing here ever waits on the database
while a reply is streaming. Under overload, turn events are dropped (counted, and logged at most
once a minute): they are telemetry; answers are rewritten by the next turn anyway, since the
flow brain re-reads every answer from the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cvi_agent.store.base import EventRecord
from cvi_agent.store.errors import describe_error, is_transient

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from cvi_agent.llm.brains.base import TurnContext
    from cvi_agent.store import SqlStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TurnSample:
    """One finished turn as measured on the hot path; becomes an `llm.turn` event later.

    Args:
        conversation_id: the conversation the turn belongs to.
        completion_id: the response's `chatcmpl-…` id (the event's dedupe key).
        persona: the persona that answered.
        stream: whether the request asked for a streamed reply.
        started_at: wall-clock time the request was parsed.
        ttft: seconds from then to the first chunk sent (None: nothing was sent).
        total: seconds until the response ended.
        completed: False when the client closed the stream first (superseded or abandoned).
        chunks: body messages sent.
        user_text: the last user message, cut to 500 characters.
        answers: the flow brain's questionnaire answers so far, if any.
        fallback: when the brain failed (llm/failure.py): (code, `speak` or `error`, whether
            part of the reply had been sent); None when it answered.
        error: the failure's cause, one line with credentials masked (None: it answered).
        request_id: the request's `x-request-id`.
        upstream_ttft: seconds from sending the request upstream to its first token, when an
            upstream answered this turn's generation (the rest of `ttft` is ours).
        replayed: the response attached to a generation already under way (llm/turns.py).
        superseded: the generation was cancelled because a longer transcript arrived.
    """

    conversation_id: str
    completion_id: str
    persona: str
    stream: bool
    started_at: float  # wall clock
    ttft: float | None  # seconds to the first chunk of the reply, its first token (None: none sent)
    total: float
    completed: bool  # False: the client closed the stream first (superseded or abandoned)
    chunks: int
    user_text: str
    answers: dict[str, str] | None
    fallback: tuple[str, str, bool] | None = None
    error: str | None = None
    request_id: str | None = None
    upstream_ttft: float | None = None
    replayed: bool = False
    superseded: bool = False

    def record(self) -> EventRecord:
        """The `llm.turn` event (source `llm`); times in milliseconds."""
        payload: dict[str, Any] = {
            "completion_id": self.completion_id,
            "persona": self.persona,
            "stream": self.stream,
            "ttft_ms": round(self.ttft * 1000, 2) if self.ttft is not None else None,
            "total_ms": round(self.total * 1000, 2),
            "completed": self.completed,
            "chunks": self.chunks,
            "user_text": self.user_text,
            "fallback": self.fallback is not None,
            "error": self.error,
            "replayed": self.replayed,
            "superseded": self.superseded,
        }
        if self.upstream_ttft is not None:
            payload["upstream_ttft_ms"] = round(self.upstream_ttft * 1000, 2)
        if self.fallback is not None:
            code, mode, mid_reply = self.fallback
            payload["fallback_reason"] = code
            payload["on_upstream_failure"] = mode
            payload["fallback_mid_reply"] = mid_reply
        if self.request_id:
            payload["request_id"] = self.request_id
        if self.answers:
            payload["answers"] = self.answers
        return EventRecord(
            conversation_id=self.conversation_id,
            source="llm",
            kind="llm.turn",
            dedupe_key=self.completion_id,
            payload=payload,
            occurred_at=self.started_at,
        )


Publish = Callable[[list[EventRecord]], Awaitable[None]]


class TurnRecorder:
    """Turn events into the store in batches, from one background task (see the module doc).

    Args:
        store: where the `llm` events and questionnaire answers go.
        publish: called with the newly stored events (the live feed), if given.
        maxsize: samples queued before new ones are dropped (and counted in `dropped`).
        linger: seconds a batch waits, after its first turn, for the turns that end meanwhile
            (at most 100 a batch). A transaction costs the same for one turn as for ten: at
            250 turns a second, writing each batch at once cost ~30 % of the server's CPU in
            `cvi-agent bench` (ARCHITECTURE.md, "Hot path"); a turn is stored this much later.
    """

    def __init__(
        self,
        store: SqlStore,
        publish: Publish | None = None,
        maxsize: int = 2000,
        linger: float = 0.05,
    ) -> None:
        self.store = store
        self.publish = publish
        self.linger = linger
        self.queue: asyncio.Queue[TurnSample] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._last_drop_log = 0.0
        self._task: asyncio.Task[None] | None = None

    def submit(self, sample: TurnSample) -> None:
        """Never blocks: a full queue drops the sample."""
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            self.dropped += 1
            ts = time.monotonic()
            if ts - self._last_drop_log > 60:
                self._last_drop_log = ts
                log.warning("turn recorder overloaded: %d turn event(s) dropped", self.dropped)

    def observe(
        self,
        ctx: TurnContext,
        completion_id: str,
        started: float,
        first: float | None,
        completed: bool,
        chunks: int,
    ) -> None:
        """Record one finished turn without waiting: the turn tracker's observer, and the hook
        for any other path that answers a turn.

        `started` and `first` are `time.perf_counter()` readings (request parsed, first chunk
        sent; `first` None when nothing was sent); `completed` False when the client went away
        first. Cheap and non-blocking; does nothing without a conversation id.
        """
        sample = _sample(ctx, completion_id, started, first, completed, chunks)
        if sample is not None:
            self.submit(sample)

    def start(self) -> None:
        """Start the drain task (idempotent); until then samples only queue up."""
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="turn-recorder")

    async def aclose(self, grace: float = 5.0) -> None:
        """Write what is queued (for at most `grace` seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _drain(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.linger > 0 and self.queue.qsize() < 99:
                # Let the turns ending meanwhile join this batch: a write's cost is mostly per
                # transaction, not per turn (see `linger`).
                await asyncio.sleep(self.linger)
            while len(batch) < 100 and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._write_patiently(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _write_patiently(self, batch: list[TurnSample]) -> None:
        """Write a batch, waiting out a database that is away (restarting, unreachable) with
        backoff; meanwhile new turns queue up to `maxsize`. Writes are idempotent, so a batch
        retried after a half-done attempt is stored once. Other errors drop the batch."""
        delay = 0.1
        waiting_since: float | None = None
        while True:
            try:
                await self.write(batch)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("could not record %d turn(s)", len(batch))
                    return
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.warning(
                        "turn recorder: database unavailable (%s); %d turn(s) wait",
                        describe_error(exc),
                        len(batch) + self.queue.qsize(),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if waiting_since is not None:
                log.warning(
                    "turn recorder: database back after %.1f s", time.monotonic() - waiting_since
                )
            return

    async def write(self, batch: list[TurnSample]) -> None:
        """Store a batch in one transaction (conversations, completed turns' answers, events),
        then publish the events that were new. Raises on failure; the drain task retries."""
        personas: dict[str, str | None] = {s.conversation_id: s.persona for s in batch}
        answers: dict[str, dict[str, str]] = {}
        for sample in batch:
            if sample.answers and sample.completed:
                answers.setdefault(sample.conversation_id, {}).update(sample.answers)
        records = [s.record() for s in batch]
        store = self.store

        async def run(conn: AsyncConnection) -> list[EventRecord]:  # one transaction
            await store.ensure_conversations(personas, conn=conn)
            for conversation_id, values in answers.items():
                await store.set_answers(conversation_id, values, conn=conn)
            return await store.add_events(records, conn=conn)

        new: list[EventRecord] = await store.transaction(run)
        if new and self.publish is not None:
            await self.publish(new)


def _last_user_text(ctx: TurnContext) -> str:
    for message in reversed(ctx.request.messages):
        if message.role == "user":
            return message.text()[:500]
    return ""


def _sample(
    ctx: TurnContext,
    completion_id: str,
    started: float,
    first: float | None,
    completed: bool,
    chunks: int,
) -> TurnSample | None:
    if not ctx.conversation_id:
        return None
    answers = ctx.state.get("answers")
    state = ctx.state
    total = time.perf_counter() - started
    return TurnSample(
        conversation_id=ctx.conversation_id,
        completion_id=completion_id,
        persona=ctx.persona.name,
        stream=bool(ctx.request.stream),
        started_at=time.time() - total,
        ttft=(first - started) if first is not None else None,
        total=total,
        completed=completed,
        chunks=chunks,
        user_text=_last_user_text(ctx),
        answers=dict(answers) if isinstance(answers, dict) and answers else None,
        fallback=state.get("fallback"),
        error=state.get("error") if state.get("fallback") is not None else None,
        request_id=state.get("request_id"),
        upstream_ttft=state.get("upstream_ttft"),
        replayed=bool(state.get("replayed")),
        superseded=bool(state.get("superseded")),
    )


async def observe_completion(
    recorder: TurnRecorder | None,
    ctx: TurnContext,
    completion_id: str,
    result: Coroutine[Any, Any, dict[str, Any]],
) -> dict[str, Any]:
    """A non-streamed turn: awaited as is, then recorded (time to first token = total). One
    answered with an error (an upstream failure, `on_upstream_failure: error`) is recorded
    too, with no first token; one the client gave up on, as not completed."""
    started = time.perf_counter()
    answered = completed = False
    try:
        body = await result
        answered = completed = True
        return body
    except asyncio.CancelledError:
        raise
    except Exception:
        completed = True
        raise
    finally:
        if recorder is not None:
            first = time.perf_counter() if answered else None
            recorder.observe(ctx, completion_id, started, first, completed, 1 if answered else 0)
