"""Speculative turns: supersede, replay, and no side effects until a turn is final.

Tavus sends several requests per user turn while the person is still talking, each with a
longer last user message, and speaks only the last; nothing marks one as speculative or final.
Per conversation id, this module runs each answer as a *generation*: its own task that pulls
the brain's events into a buffer, read by one or more *subscriptions* (the HTTP responses).

- Supersede: a request whose last user message extends a running generation's (normalized:
  case, whitespace, punctuation; same dialogue before it) cancels that generation at once. Its
  upstream request is closed and its subscribers end cleanly (finish chunk, `[DONE]`).
- Replay: a request whose normalized messages equal a running generation's, or one that
  finished less than `replay_window` seconds ago, subscribes to it: what was produced is sent
  at once, the rest live. The final request after a speculative one starts with tokens.
- Listeners: a generation whose subscribers have all gone is cancelled `replay_grace` seconds
  later (default 30 ms) unless a replay attached meanwhile; a finished one costs nothing and
  stays replayable for `replay_window` seconds.
- Side effects: a server tool with `side_effects: true` waits inside its generation until the
  conversation has been quiet (no newer request) for `side_effect_settle` seconds and someone is
  still listening. A generation superseded or abandoned meanwhile is cancelled while it waits,
  so the tool never runs; once started, a side-effecting tool is never cut half way.

See ARCHITECTURE.md, "Speculative turns", for who cancels whom.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from cvi_agent import metrics
from cvi_agent.llm.brains.base import (
    Brain,
    BrainEvent,
    Finish,
    TextDelta,
    ToolCallDelta,
    usage_of,
)
from cvi_agent.llm.brains.speech import clean_user_text, normalize
from cvi_agent.llm.coordination import TurnCoordinator
from cvi_agent.llm.failure import classify, mode_of, note
from cvi_agent.llm.sse import DONE, ChunkEncoder, encode_event

if TYPE_CHECKING:
    from starlette.types import Send

    from cvi_agent.config import Settings
    from cvi_agent.llm.brains.base import TurnContext

log = logging.getLogger(__name__)

MAX_GENERATIONS_PER_CONVERSATION = 16

# Every request of a conversation repeats its system prompt and history: normalize each distinct
# text once.
_normalize = functools.lru_cache(maxsize=1024)(normalize)
_clean = functools.lru_cache(maxsize=1024)(clean_user_text)


def turn_keys(ctx: TurnContext) -> tuple[Hashable, str | None, Hashable]:
    """(replay key, normalized speech of a trailing user message, dialogue before it).

    The replay key covers everything that shapes the answer: persona, the normalized
    messages and the sampling/tool parameters. Speech is None unless the request ends with
    a user message (only those can be superseded or supersede).
    """
    req = ctx.request
    normalized: list[Hashable] = []
    for message in req.messages:
        text = message.text()
        if message.role == "user":
            text = _clean(text)
        calls = tuple(
            (c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()
        )
        normalized.append(
            (message.role, _normalize(text), calls, message.tool_call_id, message.name)
        )
    params = (
        tuple(t.function.name for t in req.tools or ()),
        repr(req.tool_choice),
        req.temperature,
        req.top_p,
        req.max_tokens,
        req.max_completion_tokens,
        req.n,
        req.logprobs,
        req.parallel_tool_calls,
        repr(req.response_format) if req.response_format is not None else None,
        repr(req.model_extra) if req.model_extra else None,  # forwarded as they came
    )
    key = (ctx.persona.name, tuple(normalized), params)
    last = req.messages[-1]
    if last.role != "user":
        return key, None, ()
    speech = _normalize(_clean(last.text())) or None
    dialogue = (ctx.persona.name, tuple(m for m in normalized[:-1] if m[0] != "system"), params)  # type: ignore[index]
    return key, speech, dialogue


class _Conversation:
    __slots__ = ("generations", "last_request")

    def __init__(self) -> None:
        self.generations: list[Generation] = []
        self.last_request = 0.0


class Generation:
    """One answer being produced: a task filling `events`, read by any number of listeners.

    Its task is cancelled only when the generation is superseded, abandoned (its last listener
    gone for the grace period) or shut down (`TurnTracker.aclose`); a response that ends never
    cancels it directly, it only stops listening. `events`
    keeps the whole answer (for replays) until the tracker forgets the generation, at most
    `replay_window` after it ended.
    """

    __slots__ = (
        "_orphan_timer",
        "cancelled",
        "conversation",
        "ctx",
        "dialogue",
        "done",
        "error",
        "events",
        "finished_at",
        "id",
        "key",
        "key_hash",
        "listeners",
        "speech",
        "subscribers",
        "task",
        "tracker",
    )

    def __init__(
        self,
        tracker: TurnTracker,
        conversation: _Conversation,
        ctx: TurnContext,
        key: Hashable,
        key_hash: int,
        speech: str | None,
        dialogue: Hashable,
    ) -> None:
        """Made by `TurnTracker.open` only; nothing runs until `start`.

        Args:
            tracker: the tracker that owns it (grace, settle and replay settings; told when
                it ends).
            conversation: its conversation's state (the time of the latest request).
            ctx: the request that started it; the brain answers from it.
            key: the replay key (`turn_keys`): equal keys mean the same answer.
            key_hash: `hash(key)`, computed once by the tracker; compared before the key (most
                requests match none of the conversation's recent generations, and a hash tells
                most of them apart without walking the whole message history).
            speech: the normalized trailing user speech, if the request ends with a user
                message; a later request whose speech extends it supersedes this one.
            dialogue: the history before that speech; supersede only within equal dialogues.
        """
        self.tracker = tracker
        self.conversation = conversation
        self.ctx = ctx
        self.id = ctx.conversation_id
        self.key = key
        self.key_hash = key_hash
        self.speech = speech
        self.dialogue = dialogue
        self.events: list[BrainEvent] = []
        self.done = False
        self.error: BaseException | None = None
        self.cancelled: str | None = None  # why: "superseded" | "abandoned"
        self.finished_at = 0.0
        self.listeners = 0
        self.task: asyncio.Task[None] | None = None
        self.subscribers: list[GenerationReader] = []  # caught up: pushed to as events come
        self._orphan_timer: asyncio.TimerHandle | None = None

    def start(self, brain: Brain) -> None:
        """Start pulling `brain`'s events in a task of its own, independent of any response."""
        self.task = asyncio.get_running_loop().create_task(self._produce(brain))

    async def _produce(self, brain: Brain) -> None:
        events = brain.stream(self.ctx)
        push = self.events.append
        subscribers = self.subscribers
        try:
            async for event in events:
                push(event)
                if subscribers:
                    await self._deliver()
        except asyncio.CancelledError:
            pass  # superseded or abandoned: the brain's cleanup closed the upstream request
        except Exception as exc:
            self.error = exc
            log.warning(
                "persona %s conversation %s: brain failed (%s)",
                self.ctx.persona.name,
                self.id,
                exc,
            )
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            # `ctx.tools.await_final` is our bound method: a reference cycle (generation → ctx →
            # tools → generation) that only the cyclic GC would free, with the request, its
            # messages and every event of the answer. Broken here, refcounting frees it all as
            # soon as the tracker forgets the generation.
            self.ctx.tools.await_final = None
            self.done = True
            self.finished_at = asyncio.get_running_loop().time()
            await self._deliver()
            self.tracker._finished(self)

    async def _deliver(self) -> None:
        """Send what is new to every caught-up subscriber, in this task: no hop per chunk."""
        subscribers = self.subscribers
        for subscriber in subscribers if len(subscribers) == 1 else list(subscribers):
            try:
                await subscriber.deliver()
            except Exception as exc:  # that response broke; the others go on
                log.debug("conversation %s: a subscriber failed: %s", self.id, exc)

    def replayable(self, now: float, window: float) -> bool:
        """Whether a request with the same key may read this answer: running, or ended
        at most `window` seconds ago (a cancelled or failed one never is)."""
        if self.cancelled is not None or self.error is not None:
            return False
        return not self.done or now - self.finished_at <= window

    def cancel(self, reason: str) -> None:
        """Stop producing (`superseded` or `abandoned`); idempotent, no-op once done. The task's
        cancellation closes the brain and its upstream request; listeners end cleanly."""
        if self.done or self.cancelled is not None:
            return
        self.cancelled = reason
        if reason == "superseded":
            metrics.SUPERSEDED.inc()
        else:
            metrics.cancelled(reason)
        if self.task is not None:
            self.task.cancel()

    # listeners

    def attach(self) -> None:
        """A subscription starts listening; a pending abandonment is called off."""
        self.listeners += 1
        timer, self._orphan_timer = self._orphan_timer, None
        if timer is not None:
            timer.cancel()

    def detach(self) -> None:
        """A subscription stopped listening; the last one leaving arms the grace timer (or,
        with `replay_grace` 0, cancels at once) unless the answer is already complete."""
        self.listeners -= 1
        if self.listeners > 0 or self.done:
            return
        grace = self.tracker.replay_grace
        if grace <= 0:
            self.cancel("abandoned")
        else:
            loop = asyncio.get_running_loop()
            self._orphan_timer = loop.call_later(grace, self._orphaned)

    def _orphaned(self) -> None:
        self._orphan_timer = None
        if self.listeners == 0:
            self.cancel("abandoned")

    # side effects

    async def until_final(self) -> bool:
        """Hold until this generation is as final as it can be known to be (see module doc)."""
        loop = asyncio.get_running_loop()
        settle = self.tracker.side_effect_settle
        while True:
            if self.cancelled is not None:
                return False
            wait = self.conversation.last_request + settle - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.listeners > 0:
                return True
            # Nobody listens: the orphan timer cancels us unless a replay attaches first.
            await asyncio.sleep(max(self.tracker.replay_grace, 0.005))


class GenerationReader:
    """One HTTP response reading a generation. Push-driven: `run(send)` sends the backlog
    (a replay), then the generation's task sends each new chunk itself (one task, no wake-up
    per chunk), and `run` returns once the final chunk with `[DONE]` went out.

    It counts as a listener from creation until `aclose()`, whether or not it ran.
    """

    __slots__ = (
        "_closed",
        "_done",
        "completed",
        "ctx",
        "enc",
        "finish",
        "finished",
        "first_at",
        "generation",
        "index",
        "replay",
        "send",
        "sent",
        "started",
    )

    def __init__(
        self,
        generation: Generation,
        ctx: TurnContext,
        enc: ChunkEncoder,
        started: float,
        replay: bool,
    ) -> None:
        """Made by `TurnTracker.open`; counts as a listener from here on.

        Args:
            generation: the answer this response reads.
            ctx: this response's own request (a replay's differs from the generation's:
                it decides the usage chunk and is what the turn recorder records).
            enc: this response's chunk encoder (its own completion id).
            started: `time.perf_counter()` when the request was parsed (time to first token).
            replay: True when it attached to an existing generation.
        """
        self.generation = generation
        self.ctx = ctx
        self.enc = enc
        self.started = started
        self.replay = replay
        self.index = 0  # next event of the generation to send
        self.sent = 0  # messages sent (the response's keep-alive ping looks at it)
        self.finish: Finish | None = None
        self.finished = False
        self.completed = False  # the tail ([DONE]) was produced for this response
        self.first_at: float | None = None
        self.send: Send | None = None
        self._done: asyncio.Future[None] | None = None
        self._closed = False
        generation.attach()

    async def run(self, send: Send) -> None:
        """Stream the whole answer to `send` (the ASGI send of this response)."""
        self.send = send
        gen = self.generation
        while not self.finished:
            await self.deliver()
            if not self.finished and self.index == len(gen.events) and not gen.done:
                # Caught up, and nothing happened while we sent: from now on the generation
                # pushes to us (no await between the check and the registration).
                self._done = asyncio.get_running_loop().create_future()
                gen.subscribers.append(self)
                await self._done
                return

    async def deliver(self) -> None:
        """Encode and send the generation's events from `index` on; the tail once it ended."""
        send = self.send
        if self.finished or send is None:
            return
        gen = self.generation
        events = gen.events
        end = len(events)
        enc = self.enc
        parts: list[bytes] = []
        while self.index < end:
            event = events[self.index]
            self.index += 1
            kind = type(event)
            if kind is TextDelta:
                if event.text:  # type: ignore[union-attr]
                    parts.append(enc.content(event.text, event.choice, event.logprobs))  # type: ignore[union-attr]
            elif kind is ToolCallDelta:
                parts.append(
                    enc.tool_call(
                        event.index,  # type: ignore[union-attr]
                        event.id,  # type: ignore[union-attr]
                        event.name,  # type: ignore[union-attr]
                        event.arguments,  # type: ignore[union-attr]
                        event.choice,  # type: ignore[union-attr]
                    )
                )
            else:
                self.finish = event  # type: ignore[assignment]
        first = bool(parts) and not self.sent
        if gen.done and self.index >= len(events):
            parts.extend(self._tail(bool(parts) or self.sent > 0))
            self.finished = True
            self.completed = True
        if not parts:
            return
        if first:
            self._first_token()
        self.sent += 1
        try:
            await send(
                {
                    "type": "http.response.body",
                    "body": parts[0] if len(parts) == 1 else b"".join(parts),
                    "more_body": not self.finished,
                }
            )
        except Exception:  # this response is broken: it must not break the generation
            self.finished = True
            raise
        finally:
            if self.finished:
                self._release()

    def _tail(self, sent: bool) -> list[bytes]:
        enc = self.enc
        tail: list[bytes] = []
        finish = self.finish
        error = self.generation.error
        if error is not None and finish is None:
            # This response's headers went out when it started: the failure can only be said
            # in the body (an error event) and in the turn's record (llm/failure.py).
            failure = classify(error, sent)
            mode = mode_of(self.ctx)
            note(self.ctx, failure, mode, sent)
            if mode == "error":
                return [encode_event(failure.api_error().payload()), DONE]
            if not sent:
                tail.append(enc.content(self.ctx.persona.fallback_text))
            finish = Finish("stop")
        if finish is None:
            finish = Finish("stop")  # superseded or abandoned: end cleanly all the same
        tail.append(enc.end(finish.reason, usage_of(self.ctx, finish), finish.others))
        return tail

    def _release(self) -> None:
        try:
            self.generation.subscribers.remove(self)
        except ValueError:
            pass
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    async def aclose(self) -> None:
        """The response ended (done, failed or the client left). Idempotent: stops listening
        (which may start the generation's grace timer) and hands the turn to the observer
        exactly once."""
        self.finished = True
        self._release()
        if not self._closed:
            self._closed = True
            self.generation.detach()
            observer = self.generation.tracker.observer
            if observer is not None:
                # What the record tells apart: a replay, a superseded generation, and the
                # upstream's share of the time to first token (llm/recording.py).
                state = self.ctx.state
                state["replayed"] = self.replay
                state["superseded"] = self.generation.cancelled == "superseded"
                upstream = self.generation.ctx.state.get("upstream_ttft")
                if upstream is not None and not self.replay:
                    state["upstream_ttft"] = upstream
                observer(
                    self.ctx, self.enc.id, self.started, self.first_at, self.completed, self.sent
                )

    def _first_token(self) -> None:
        first = self.first_at = time.perf_counter()
        upstream = None if self.replay else self.generation.ctx.state.get("upstream_ttft")
        ttft = self.ctx.state["ttft"] = first - self.started  # the request log's (web/access.py)
        metrics.first_token(self.ctx.persona.name, ttft, upstream)


TurnObserver = Callable[["TurnContext", str, float, "float | None", bool, int], None]


class TurnTracker(TurnCoordinator):
    """Per-process registry of generations by conversation id (all on the event loop).

    Bounded: past `MAX_GENERATIONS_PER_CONVERSATION` in one conversation the oldest finished
    ones are dropped, and a conversation is forgotten with its last generation. `settings` gives
    `replay_window`, `replay_grace` and `side_effect_settle`. State is in-process only: across
    processes, `SharedTurns` (llm/shared_turns.py) sends every turn of a conversation to the
    tracker of one process (ARCHITECTURE.md, "Speculative turns across processes").
    """

    def __init__(self, settings: Settings) -> None:
        self.replay_window = settings.replay_window
        self.replay_grace = settings.replay_grace
        self.side_effect_settle = settings.side_effect_settle
        self._conversations: dict[str, _Conversation] = {}
        # Told about every subscription when it closes: (ctx, completion id, started, first
        # chunk sent at, completed, messages sent). `ChatService.start` sets the turn recorder's.
        self.observer: TurnObserver | None = None

    def open(
        self, brain: Brain, ctx: TurnContext, enc: ChunkEncoder, started: float
    ) -> GenerationReader:
        """Answer a streamed request that carries a conversation id: replay a generation with
        the same key, else supersede the ones this request extends and start a new one. The
        caller owns the returned subscription and must `aclose()` it (the response does)."""
        assert ctx.conversation_id is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        conversation = self._conversations.get(ctx.conversation_id)
        if conversation is None:
            conversation = self._conversations[ctx.conversation_id] = _Conversation()
        conversation.last_request = now
        key, speech, dialogue = turn_keys(ctx)
        key_hash = hash(key)
        generations = conversation.generations
        for generation in generations:
            if (
                generation.key_hash == key_hash
                and generation.key == key
                and generation.replayable(now, self.replay_window)
            ):
                metrics.REPLAYED.inc()
                return GenerationReader(generation, ctx, enc, started, replay=True)
        if speech is not None:
            for generation in generations:
                if (
                    not generation.done
                    and generation.speech is not None
                    and generation.dialogue == dialogue
                    and speech != generation.speech
                    and speech.startswith(generation.speech)
                ):
                    generation.cancel("superseded")
        generation = Generation(self, conversation, ctx, key, key_hash, speech, dialogue)
        ctx.side_effects_allowed = False
        ctx.tools.await_final = generation.until_final
        generations.append(generation)
        if len(generations) > MAX_GENERATIONS_PER_CONVERSATION:
            excess = len(generations) - MAX_GENERATIONS_PER_CONVERSATION
            for old in [g for g in generations if g.done][:excess]:
                generations.remove(old)
        subscription = GenerationReader(generation, ctx, enc, started, replay=False)
        generation.start(brain)
        return subscription

    def _finished(self, generation: Generation) -> None:
        if generation.cancelled is not None or generation.error is not None:
            self._forget(generation)
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.replay_window, self._forget, generation)

    def _forget(self, generation: Generation) -> None:
        conversation_id = generation.id
        if conversation_id is None:
            return
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return
        try:
            conversation.generations.remove(generation)
        except ValueError:
            return
        if not conversation.generations:
            del self._conversations[conversation_id]

    def running(self, conversation_id: str) -> bool:
        """Whether a generation of this conversation is still running."""
        conversation = self._conversations.get(conversation_id)
        return conversation is not None and any(not g.done for g in conversation.generations)

    def active(self) -> int:
        """Generations still running (for tests and shutdown)."""
        return sum(1 for c in self._conversations.values() for g in c.generations if not g.done)

    async def aclose(self) -> None:
        """Cancel every running generation and wait for their brains to close (shutdown)."""
        tasks = []
        for conversation in list(self._conversations.values()):
            for generation in conversation.generations:
                if generation.task is not None and not generation.done:
                    generation.task.cancel()
                    tasks.append(generation.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conversations.clear()
