"""ConversationBot: one bot in one conversation's room.

It joins the room, names itself, tells the replica from the humans, records every event (through
the `Recorder`, never blocking the room), sends interactions, answers the persona's client tools,
and leaves when the conversation ends or the last human has gone (after a grace period), so
Tavus's own timeouts can fire. Room callbacks arrive on the loop's thread and do only cheap,
synchronous work; anything slow (tool handlers, sends) runs in tasks the bot owns and cancels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cvi_agent.bot.recorder import Pending, Recorder
from cvi_agent.bot.seqgaps import DEFAULT_WINDOW, SeqGap, SeqGaps
from cvi_agent.llm.tools import ToolCallContext, ToolError, resolve_handler
from cvi_agent.personas import Persona, ToolSpec
from cvi_agent.protocol.events import (
    InvalidEvent,
    PerceptionAnalysis,
    PerceptionToolCall,
    RoomEvent,
    SpeakingEvent,
    SystemEvent,
    ToolCallEvent,
    UnknownEvent,
    Utterance,
    UtteranceStreaming,
    parse_event,
)
from cvi_agent.protocol.interactions import (
    AppendContext,
    Echo,
    EchoAudio,
    Interaction,
    Interrupt,
    OverwriteContext,
    Respond,
    Sensitivity,
    SetSensitivity,
    ToolResult,
)
from cvi_agent.protocol.redact import redact_text, redact_url
from cvi_agent.rooms.base import Participant, Room, RoomClosed, RoomError, RoomListener
from cvi_agent.store import EventRecord, SqlStore, ToolCallRecord, UtteranceRecord

log = logging.getLogger("cvi_agent.bot")

OnRecord = Callable[[EventRecord], Awaitable[None]]

MAX_TOOL_OUTPUT = 100_000
MAX_ECHO = 10_000
_LOG_TEXT = 160


@dataclass(slots=True)
class RoomToolContext(ToolCallContext):
    """What a client-tool handler gets as `ctx`: the server-tool context plus the bot."""

    bot: ConversationBot | None = None


@dataclass(slots=True)
class BotStats:
    """Counters a user would ask about. Speaking counts use one family only: the generic
    `conversation.*_speaking` events, or the legacy per-role twins when that is all there is."""

    events: int = 0
    invalid: int = 0
    unknown: int = 0
    utterances: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    interactions: int = 0
    seq_gaps: int = 0  # holes in the replica's `seq` numbers (events never received)
    seq_missing: int = 0
    _speaking: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"generic": {}, "legacy": {}}
    )
    _interruptions: dict[str, int] = field(default_factory=lambda: {"generic": 0, "legacy": 0})

    def count_speaking(self, event: SpeakingEvent) -> None:
        """Count a started/stopped-speaking event into its family (generic or legacy)."""
        family = "legacy" if event.legacy else "generic"
        if event.started:
            counts = self._speaking[family]
            role = event.role or "unknown"
            counts[role] = counts.get(role, 0) + 1
        elif event.interrupted:
            self._interruptions[family] += 1

    def _family(self) -> str:
        return "generic" if self._speaking["generic"] or not self._speaking["legacy"] else "legacy"

    @property
    def speaking_turns(self) -> dict[str, int]:
        """How many times each role started speaking."""
        return dict(self._speaking[self._family()])

    @property
    def interruptions(self) -> int:
        """How many times someone stopped speaking because they were interrupted."""
        return self._interruptions[self._family()]

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON (the `bot.left` record and `cvi-agent bot`'s summary)."""
        return {
            "events": self.events,
            "invalid": self.invalid,
            "unknown": self.unknown,
            "utterances": self.utterances,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "interactions": self.interactions,
            "seq_gaps": self.seq_gaps,
            "seq_missing": self.seq_missing,
            "speaking_turns": self.speaking_turns,
            "interruptions": self.interruptions,
        }


def _clip(text: str, limit: int = _LOG_TEXT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded(value: str | None, limit: int) -> str | None:
    return _text(value[:limit]) if value is not None else None


def _text(value: str) -> str:
    """Text the database accepts: PostgreSQL rejects NUL characters."""
    return value.replace("\x00", "") if "\x00" in value else value


def _bounded_int(value: int | None, bits: int) -> int | None:
    if value is None or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        return value
    return None


def _canonical(value: Any) -> str:
    """Sorted-key JSON of a message (what a content hash is taken of)."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _encode_output(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _spoken_result(value: Any) -> str:
    """What to say for a tool result: its `summary` or `text`, else the result itself."""
    if isinstance(value, dict):
        for key in ("summary", "text"):
            if isinstance(value.get(key), str) and value[key].strip():
                return str(value[key])
    return _encode_output(value)


class ConversationBot(RoomListener):
    """One bot in one conversation's room: `start()` joins, `run()` waits for the end, leaves
    and flushes; `stop()` (idempotent) ends it from outside.

    Everything runs on the loop's thread. Room callbacks (`on_…`) only parse, count, queue a
    record and maybe start a task; they never await, so the room is never held up. The bot
    owns its client-tool tasks and its leave timer and cancels them on stop, before it leaves
    the room and drains the recorder. See ARCHITECTURE.md, "The room bot".
    """

    def __init__(
        self,
        room: Room,
        *,
        conversation_id: str,
        store: SqlStore,
        persona: Persona | None = None,
        bot_name: str = "cvi-agent",
        on_record: OnRecord | None = None,
        leave_grace: float = 10.0,
        absent_timeout: float | None = 300.0,
        tool_timeout: float = 10.0,
        audio_chunk_ms: int = 100,
        recorder: Recorder | None = None,
        log_prefix: str | None = None,
        gap_window: float = DEFAULT_WINDOW,
    ) -> None:
        """Set up the bot; nothing touches the room until `start()`.

        Args:
            room: the room to join (`DailyRoom`, or `LocalRoom` for `ws://` URLs); the bot
                becomes its listener and sets its user name.
            conversation_id: what every record is filed under.
            store: where records go (through the recorder), and where a bot taking over reads
                the last `seq` already stored.
            persona: whose `execution: client` tools with a `handler` the bot answers, and
                whose `persona_name` identifies the replica; None: no tools are answered and
                the replica is known by its user id only.
            bot_name: the bot's user name in the room; participants with that name are other
                bots (a handover), never humans.
            on_record: awaited with each newly stored record (the worker publishes it on the
                live feed); only with the bot's own recorder (ValueError with `recorder`).
            leave_grace: seconds to stay after the last human left.
            absent_timeout: leave when no human has joined this long after the join (None:
                wait for ever).
            tool_timeout: seconds a client-tool handler may take when its spec sets no
                `timeout`.
            audio_chunk_ms: length of each chunk `echo_audio` sends.
            recorder: share one recorder between bots (the bot then only flushes it on stop);
                by default the bot owns one.
            log_prefix: prepended to every log line (default `[<conversation_id>] `).
            gap_window: how long a hole in the `seq` numbers may stay open (out-of-order
                arrival) before it is recorded as `bot.seq_gap`.
        """
        self.room = room
        self.conversation_id = conversation_id
        self.store = store
        self.persona = persona
        self.bot_name = bot_name
        self.leave_grace = leave_grace
        self.absent_timeout = absent_timeout
        self.tool_timeout = tool_timeout
        self.audio_chunk_ms = audio_chunk_ms
        self.stats = BotStats()
        self.replicas: dict[str, Participant] = {}
        self.humans: dict[str, Participant] = {}
        self.reason: str | None = None
        if recorder is not None and on_record is not None:
            raise ValueError("pass on_record to the shared Recorder, not to the bot")
        self._owns_recorder = recorder is None
        self.recorder = recorder or Recorder(store, on_record=on_record)
        self._prefix = f"[{conversation_id}] " if log_prefix is None else log_prefix
        self._ended: asyncio.Future[str] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._started = False
        self._joined = False
        self._seen_human = False
        self._leave_timer: asyncio.TimerHandle | None = None
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self._tool_keys: set[str] = set()
        self.seq_gaps = SeqGaps(self._on_seq_gap, window=gap_window)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, url: str, meeting_token: str | None = None) -> None:
        """Join the room (raises `RoomJoinError`, after recording the failure)."""
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self.room.listener = self
        self.room.user_name = self.bot_name
        if self._owns_recorder:
            self.recorder.start()
        await self._seq_baseline()
        try:
            await self.room.join(url, meeting_token)
        except BaseException as exc:
            # The room URL may carry the meeting token (`?t=`): never into the record.
            self.reason = redact_text(f"join failed: {exc}")
            self._record_bot(
                "bot.join_failed", {"url": redact_url(url), "error": redact_text(str(exc))}
            )
            if self._owns_recorder:
                await self.recorder.close()
            else:
                await self.recorder.flush()
            if not self._ended.done():
                self._ended.set_result(self.reason)
            raise
        self._joined = True
        local = self.room.local_participant
        self._record_bot(
            "bot.joined",
            {
                "url": url,
                "bot_name": self.bot_name,
                "participant_id": local.id if local else None,
                "persona": self.persona.name if self.persona else None,
            },
        )
        self._info("joined %s as %s", url, self.bot_name)
        if not self._seen_human and self.absent_timeout is not None:
            self._arm_timer(self.absent_timeout, "no human joined")

    async def run(self) -> str:
        """Until the conversation ends, the last human left (after `leave_grace`) or the room is
        lost; then leave and flush. Returns the reason. Cancelling `run()` stops the bot too."""
        if self._ended is None:
            raise RuntimeError("call start() before run()")
        reason = "cancelled"
        try:
            reason = await asyncio.shield(self._ended)
        finally:
            await self.stop(reason)
        return self.reason or reason

    async def stop(self, reason: str = "stopped") -> None:
        """Cancel tool work, leave the room, flush the recorder. Idempotent."""
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(reason)
        if self._stop_task is None:
            self.reason = self.reason or reason
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(self.reason))
        await asyncio.shield(self._stop_task)

    async def _stop(self, reason: str) -> None:
        self._cancel_timer()
        self.seq_gaps.flush()  # nothing more will arrive: the holes left are losses
        for task in list(self._tool_tasks):
            task.cancel()
        if self._tool_tasks:
            await asyncio.gather(*self._tool_tasks, return_exceptions=True)
        if self._started:  # also ends a join still under way
            try:
                await self.room.leave()
            except Exception:
                log.exception("%sleaving the room failed", self._prefix)
        if self._joined:
            self._record_bot("bot.left", {"reason": reason, "stats": self.stats.as_dict()})
            self._info("left the room: %s", reason)
        if self._owns_recorder:
            await self.recorder.close()
        else:
            await self.recorder.flush()

    def request_stop(self, reason: str = "stopped") -> None:
        """Ask `run()` to end (leave and flush) soon; callable from synchronous code."""
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self._ended is not None and not self._ended.done():
            self.reason = self.reason or reason
            self._ended.set_result(reason)

    # -- sending ----------------------------------------------------------------------------------

    async def send(self, interaction: Interaction) -> None:
        """Send one interaction and record it; raises `RoomError` if the room cannot take it."""
        await self._send(interaction.to_message(self.conversation_id), interaction)

    async def echo(self, text: str) -> None:
        """Have the replica say `text` as is, without the LLM."""
        await self.send(Echo(text=text))

    async def echo_audio(
        self, pcm: bytes, sample_rate: int = 24000, inference_id: str | None = None
    ) -> str:
        """Speak raw 16-bit mono PCM: ~100 ms chunks sharing one `inference_id`, `done` on the
        last. Recorded once (without the audio). Returns the inference id."""
        if not pcm or len(pcm) % 2:
            raise ValueError("pcm must be non-empty 16-bit mono audio (an even number of bytes)")
        self._check_open()
        inference_id = inference_id or uuid.uuid4().hex
        step = max(2, int(sample_rate * self.audio_chunk_ms / 1000) * 2)
        chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
        seconds = len(pcm) / 2 / sample_rate
        summary = {
            "message_type": "conversation",
            "event_type": "conversation.echo",
            "conversation_id": self.conversation_id,
            "properties": {
                "modality": "audio",
                "sample_rate": sample_rate,
                "inference_id": inference_id,
                "chunks": len(chunks),
                "bytes": len(pcm),
                "seconds": seconds,
            },
        }
        self._record_interaction(summary, inference_id=inference_id)
        self._info("→ echo audio: %.2f s in %d chunks (%s)", seconds, len(chunks), inference_id)
        for index, chunk in enumerate(chunks):
            message = EchoAudio(
                audio=base64.b64encode(chunk).decode("ascii"),
                sample_rate=sample_rate,
                inference_id=inference_id,
                done=index == len(chunks) - 1,
            ).to_message(self.conversation_id)
            await self._deliver(message)
        return inference_id

    async def respond(self, text: str) -> None:
        """Have the replica answer `text` as if the user had said it (through the LLM)."""
        await self.send(Respond(text=text))

    async def interrupt(self) -> None:
        """Make the replica stop speaking at once."""
        await self.send(Interrupt())

    async def overwrite_context(self, context: str) -> None:
        """Replace the conversation's `conversational_context` (what the LLM is told)."""
        await self.send(OverwriteContext(context=context))

    async def append_context(self, context: str, job_status: str | None = None) -> None:
        """Append to the conversation's context (`job_status` passed through when given)."""
        await self.send(AppendContext(context=context, job_status=job_status))

    async def sensitivity(
        self, *, pause: Sensitivity | None = None, interrupt: Sensitivity | None = None
    ) -> None:
        """Each given sensitivity is one message (the protocol allows one per message)."""
        if pause is None and interrupt is None:
            raise ValueError("give pause= or interrupt= (or both)")
        if pause is not None:
            await self.send(SetSensitivity(participant_pause_sensitivity=pause))
        if interrupt is not None:
            await self.send(SetSensitivity(participant_interrupt_sensitivity=interrupt))

    async def tool_result(
        self, tool_call_id: str, output: Any, status: Literal["success", "error"] = "success"
    ) -> None:
        """Answer a client tool call by hand (handlers named in the persona are answered by
        the bot itself)."""
        await self.send(ToolResult(tool_call_id=tool_call_id, output=output, status=status))

    async def _send(
        self,
        message: dict[str, Any],
        interaction: Interaction,
        tool_call: ToolCallRecord | None = None,
    ) -> None:
        self._check_open()
        self._record_interaction(message, tool_call=tool_call)
        if log.isEnabledFor(logging.INFO):
            self._info("→ %s", _describe_interaction(interaction))
        await self._deliver(message)

    def _check_open(self) -> None:
        if self._stop_task is not None:
            raise RoomClosed("the bot has stopped")

    async def _deliver(self, message: dict[str, Any]) -> None:
        try:
            await self.room.send_app_message(message)
        except RoomError as exc:
            log.warning("%s%s was not delivered: %s", self._prefix, message["event_type"], exc)
            self._record_bot(
                "interaction.error", {"event_type": message["event_type"], "error": str(exc)}
            )
            raise

    def _record_interaction(
        self,
        message: dict[str, Any],
        *,
        inference_id: str | None = None,
        tool_call: ToolCallRecord | None = None,
    ) -> None:
        self.stats.interactions += 1
        self._record_bot(
            "interaction." + message["event_type"],
            message,
            inference_id=inference_id,
            tool_call=tool_call,
        )

    def _record_bot(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        inference_id: str | None = None,
        tool_call: ToolCallRecord | None = None,
    ) -> None:
        """Something the bot did. A tool-call update rides along, so the recorder applies it
        after the row of the call itself."""
        record = EventRecord(
            conversation_id=self.conversation_id,
            source="bot",
            kind=kind,
            dedupe_key=f"{self.conversation_id}:bot:{uuid.uuid4().hex}",
            payload=payload,
            inference_id=inference_id,
            occurred_at=time.time(),
        )
        self.recorder.put(Pending(record, tool_call=tool_call))

    # -- room callbacks (on the loop's thread; cheap and synchronous) ------------------------------

    def on_app_message(self, message: Any, sender: str | None) -> None:
        """A room event: parsed (never raises), recorded, logged; a tool call of ours starts
        its handler's task, and `system.shutdown` ends the bot."""
        self.stats.events += 1
        event = parse_event(message)
        if isinstance(event, InvalidEvent):
            self._on_invalid(event, sender)
            return
        pending = Pending(self._room_record(event))
        if pending.event.seq is not None and self._stop_task is None:
            self.seq_gaps.see(pending.event.seq)
        if isinstance(event, Utterance):
            self.stats.utterances += 1
            pending.utterance = self._utterance(event, intended_text=event.speech)
        elif isinstance(event, UtteranceStreaming) and event.final:
            pending.utterance = self._utterance(
                event, spoken_text=event.speech, is_interrupted=event.is_interrupted
            )
        elif isinstance(event, SpeakingEvent):
            self.stats.count_speaking(event)
        elif isinstance(event, ToolCallEvent):
            self.stats.tool_calls += 1
            pending.tool_call = self._tool_record(event, "called", None)
        elif isinstance(event, UnknownEvent):
            self.stats.unknown += 1
        self.recorder.put(pending)
        if log.isEnabledFor(logging.INFO):
            self._log_event(event, sender)
        if isinstance(event, ToolCallEvent):
            self._maybe_answer(event, sender)
        elif isinstance(event, SystemEvent) and event.is_shutdown:
            why = event.shutdown_reason
            self._end(f"conversation ended ({why})" if why else "conversation ended")

    def on_participant_joined(self, participant: Participant) -> None:
        """Record who joined as replica, bot or human; a human calls off any leave timer."""
        role = self._classify(participant)
        if role == "replica":
            self.replicas[participant.id] = participant
        elif role == "human":
            self.humans[participant.id] = participant
            self._seen_human = True
            self._cancel_timer()
        self._record_participant("participant.joined", participant, role, None)
        self._info("+ %s joined (%s)", participant.user_name or participant.id, role)

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        """Record who left; when the last human leaves, leave `leave_grace` seconds later."""
        role = self._classify(participant)
        self.replicas.pop(participant.id, None)
        was_human = self.humans.pop(participant.id, None) is not None
        self._record_participant("participant.left", participant, role, reason)
        self._info(
            "- %s left (%s%s)",
            participant.user_name or participant.id,
            role,
            f", {reason}" if reason else "",
        )
        if was_human and not self.humans:
            self._info(
                "the last human left; leaving in %g s unless someone joins", self.leave_grace
            )
            self._arm_timer(self.leave_grace, "the last human left")

    def on_disconnected(self, reason: str, permanent: bool) -> None:
        """Record the drop; a permanent one (the room gave up reconnecting) ends the bot."""
        self._record_bot("bot.disconnected", {"reason": reason, "permanent": permanent})
        if permanent:
            self._end(f"room lost: {reason}")

    def on_reconnected(self) -> None:
        """Record it; events sent while away show up as `bot.seq_gap` records."""
        self._record_bot("bot.reconnected", {})

    # -- gaps in `seq` ------------------------------------------------------------------------------

    async def _seq_baseline(self) -> None:
        """A bot taking over a conversation continues from the highest `seq` already stored, so
        what was sent while no bot was in the room shows up as a gap. Best effort: a database
        that does not answer at once must not delay the join.

        The query is never cancelled: cancelling a SQLAlchemy async connection in the middle of
        a statement can leave it checked out of the pool for good (measured: 100 bots starting
        at once on SQLite exhausted the pool and every recorder stalled). On timeout we stop
        waiting; the query finishes on its own and its answer still counts if no event came."""
        task = asyncio.ensure_future(self.store.max_seq(self.conversation_id, source="room"))

        def apply(done: asyncio.Future[int | None]) -> None:
            if done.cancelled():
                return
            exc = done.exception()
            if exc is not None:
                log.warning("%scould not read the last stored seq: %s", self._prefix, exc)
                return
            highest = done.result()
            if highest is not None:
                self.seq_gaps.start_after(highest)

        task.add_done_callback(apply)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 2.0)

    def _on_seq_gap(self, gap: SeqGap) -> None:
        self.stats.seq_gaps += 1
        self.stats.seq_missing += gap.missing
        log.warning(
            "%s%d event(s) never received: seq %d..%d (a dropped connection or a handover)",
            self._prefix,
            gap.missing,
            gap.after + 1,
            gap.before - 1,
        )
        self._record_bot("bot.seq_gap", gap.as_dict())

    # -- helpers ----------------------------------------------------------------------------------

    def is_replica(self, participant: Participant) -> bool:
        """TAVUS_PROTOCOL §6: the replica's user name is the persona name, or its user id
        contains `tavus-replica`."""
        if "tavus-replica" in (participant.user_id or "").lower():
            return True
        return self.persona is not None and participant.user_name == self.persona.persona_name

    def _classify(self, participant: Participant) -> str:
        if self.is_replica(participant):
            return "replica"
        if participant.user_name == self.bot_name:
            return "bot"  # another instance of us (e.g. during a handover) is not a human
        return "human"

    def _arm_timer(self, delay: float, reason: str) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._leave_timer = loop.call_later(delay, self._end, reason)

    def _cancel_timer(self) -> None:
        if self._leave_timer is not None:
            self._leave_timer.cancel()
            self._leave_timer = None

    def _room_record(self, event: RoomEvent) -> EventRecord:
        seq = _bounded_int(event.seq, 64)
        kind = event.event_type[:128]
        if seq is not None:
            # Tavus numbers the events of a conversation: type + seq (+ inference) is one delivery.
            identity = f"{seq}:{(event.inference_id or '-')[:128]}"
        else:
            identity = "h" + _digest(_canonical(event.raw))
        return EventRecord(
            conversation_id=self.conversation_id,
            source="room",
            kind=kind,
            dedupe_key=f"{self.conversation_id}:{kind}:{identity}",
            payload=event.raw,  # as received; the recorder scrubs it if the database refuses it
            seq=seq,
            inference_id=_bounded(event.inference_id, 128),
            turn_idx=_bounded_int(event.turn_idx, 32),
            role=_bounded(event.role, 32),
            occurred_at=event.timestamp,
        )

    def _on_invalid(self, event: InvalidEvent, sender: str | None) -> None:
        self.stats.invalid += 1
        canonical = _canonical(event.raw)
        if isinstance(event.raw, dict):
            payload = event.raw
        else:
            payload = {"invalid": event.reason, "raw": canonical[:10_000]}
        kind = (event.event_type or "invalid")[:128]
        self.recorder.put(
            Pending(
                EventRecord(
                    conversation_id=self.conversation_id,
                    source="room",
                    kind=kind,
                    dedupe_key=f"{self.conversation_id}:{kind}:-:{_digest(canonical)}",
                    payload=payload,
                )
            )
        )
        log.warning(
            "%s✗ ignored a malformed message from %s: %s", self._prefix, sender, event.reason
        )

    def _utterance(
        self,
        event: Utterance | UtteranceStreaming,
        *,
        intended_text: str | None = None,
        spoken_text: str | None = None,
        is_interrupted: bool | None = None,
    ) -> UtteranceRecord | None:
        role = _bounded(event.role, 32)
        if role is None:
            return None
        key = event.inference_id or (f"seq:{event.seq}" if event.seq is not None else None)
        if key is None:
            key = "msg:" + _digest(_canonical(event.raw))
        return UtteranceRecord(
            conversation_id=self.conversation_id,
            role=role,
            key=_text(key[:256]),
            intended_text=_text(intended_text) if intended_text is not None else None,
            spoken_text=_text(spoken_text) if spoken_text is not None else None,
            is_interrupted=is_interrupted,
            inference_id=_bounded(event.inference_id, 128),
            turn_idx=_bounded_int(event.turn_idx, 32),
            seq=_bounded_int(event.seq, 64),
            occurred_at=event.timestamp,
        )

    def _record_participant(
        self, kind: str, participant: Participant, role: str, reason: str | None
    ) -> None:
        payload: dict[str, Any] = {"participant": participant.as_dict(), "role": role}
        if reason is not None:
            payload["reason"] = reason
        self.recorder.put(
            Pending(
                EventRecord(
                    conversation_id=self.conversation_id,
                    source="room",
                    kind=kind,
                    dedupe_key=f"{self.conversation_id}:{kind}:{participant.id}",
                    payload=payload,
                    role=role,
                    occurred_at=time.time(),
                )
            )
        )

    # -- client tools -------------------------------------------------------------------------------

    def _maybe_answer(self, event: ToolCallEvent, sender: str | None) -> None:
        spec = self.persona.tool(event.name) if self.persona is not None else None
        if spec is None or spec.execution != "client" or not spec.handler:
            return  # not ours to answer (another participant may)
        if sender is not None and sender in self.humans:
            log.warning(
                "%signored tool call %s from a human participant (%s)",
                self._prefix,
                event.name,
                sender,
            )
            return
        key = event.call_key
        if key in self._tool_keys:
            return  # a duplicate delivery: the handler already ran
        self._tool_keys.add(key)
        task = asyncio.get_running_loop().create_task(self._answer(event, spec))
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    async def _answer(self, event: ToolCallEvent, spec: ToolSpec) -> None:
        call_id = event.tool_call_id or event.call_key
        result: Any = None
        error: str | None = None
        try:
            args = event.parsed_arguments()
            handler = resolve_handler(spec)
            assert self.persona is not None  # spec came from it
            ctx = RoomToolContext(self.conversation_id, self.persona, spec, call_id, bot=self)
            result = await asyncio.wait_for(
                handler(args, ctx), timeout=spec.timeout or self.tool_timeout
            )
        except asyncio.CancelledError:
            self._record_tool_cancelled(event)
            raise
        except json.JSONDecodeError:
            error = "arguments are not valid JSON"
        except TimeoutError:
            error = "the tool timed out"
        except (ToolError, LookupError, ValueError) as exc:
            error = str(exc) or type(exc).__name__
        except Exception:
            log.exception("%sclient tool %s failed", self._prefix, event.name)
            error = "the tool failed"
        output = _encode_output(result) if error is None else ""
        if error is None and len(output) > MAX_TOOL_OUTPUT:
            error = "the tool's output is too large"
        interaction: Interaction
        if error is not None:
            self.stats.tool_errors += 1
            output = json.dumps({"error": error})
            interaction = ToolResult(tool_call_id=call_id, output=output, status="error")
        elif spec.reply == "echo":
            interaction = Echo(text=_clip(_spoken_result(result), MAX_ECHO) or "Done.")
        elif spec.reply == "append_context":
            interaction = AppendContext(context=output or "{}")
        else:
            interaction = ToolResult(tool_call_id=call_id, output=output, status="success")
        status = "error" if error is not None else "success"
        record = self._tool_record(event, status, output)
        try:
            await self._send(interaction.to_message(self.conversation_id), interaction, record)
        except RoomError:
            pass  # recorded (interaction.error) and logged by _deliver

    def _tool_record(self, event: ToolCallEvent, status: str, output: str | None) -> ToolCallRecord:
        return ToolCallRecord(
            conversation_id=self.conversation_id,
            key=_text(event.call_key[:256]),
            name=_text(event.name[:128]),
            arguments=_text(event.arguments),
            tool_call_id=_bounded(event.tool_call_id, 128),
            inference_id=_bounded(event.inference_id, 128),
            status=status,
            output=_text(output) if output is not None else None,
            occurred_at=event.timestamp,
        )

    def _record_tool_cancelled(self, event: ToolCallEvent) -> None:
        output = json.dumps({"error": "cancelled: the bot stopped"})
        self._record_bot(
            "tool.cancelled",
            {"tool_call_id": event.call_key, "name": event.name},
            tool_call=self._tool_record(event, "error", output),
        )

    # -- logging --------------------------------------------------------------------------------------

    def _info(self, fmt: str, *args: Any) -> None:
        log.info(self._prefix + fmt, *args)

    def _log_event(self, event: RoomEvent, sender: str | None) -> None:
        who = event.role or ("replica" if sender in self.replicas else "room")
        if isinstance(event, Utterance):
            self._info('← %s: "%s"', who, _clip(event.speech))
        elif isinstance(event, UtteranceStreaming):
            if event.final:
                cut = ", interrupted" if event.is_interrupted else ""
                self._info('← %s (spoken%s): "%s"', who, cut, _clip(event.speech))
            else:
                log.debug('%s← %s (speaking): "%s"', self._prefix, who, _clip(event.speech))
        elif isinstance(event, SpeakingEvent):
            verb = "started speaking" if event.started else "stopped speaking"
            extra = []
            if event.interrupted:
                extra.append("interrupted")
            if event.duration is not None:
                extra.append(f"{event.duration:.1f} s")
            details = f" ({', '.join(extra)})" if extra else ""
            if event.legacy:
                log.debug("%s← %s %s%s (legacy)", self._prefix, who, verb, details)
            else:
                self._info("← %s %s%s", who, verb, details)
        elif isinstance(event, ToolCallEvent):
            self._info(
                "← tool call %s %s (%s)", event.name, _clip(event.arguments, 120), event.call_key
            )
        elif isinstance(event, PerceptionToolCall):
            self._info("← perception tool call %s", event.name)
        elif isinstance(event, PerceptionAnalysis):
            self._info("← perception analysis: %s", _clip(_encode_output(event.analysis)))
        elif isinstance(event, SystemEvent):
            why = f" ({event.shutdown_reason})" if event.shutdown_reason else ""
            self._info("← %s%s", event.event_type, why)
        else:
            self._info("← %s (kept as is)", event.event_type)


def _describe_interaction(interaction: Interaction) -> str:
    if isinstance(interaction, Echo):
        return f'echo: "{_clip(interaction.text)}"'
    if isinstance(interaction, Respond):
        return f'respond: "{_clip(interaction.text)}"'
    if isinstance(interaction, Interrupt):
        return "interrupt"
    if isinstance(interaction, OverwriteContext):
        return f'overwrite context: "{_clip(interaction.context)}"'
    if isinstance(interaction, AppendContext):
        return f'append context: "{_clip(interaction.context)}"'
    if isinstance(interaction, SetSensitivity):
        return "sensitivity: " + ", ".join(
            f"{k.removeprefix('participant_').removesuffix('_sensitivity')}={v}"
            for k, v in interaction.properties().items()
        )
    if isinstance(interaction, ToolResult):
        return f"tool result {interaction.tool_call_id} {interaction.status}: {_clip(interaction.output, 120)}"
    if isinstance(interaction, EchoAudio):
        return f"echo audio chunk ({interaction.inference_id})"
    return interaction.event_type  # pragma: no cover


__all__ = ["BotStats", "ConversationBot", "RoomToolContext"]
