"""The conversation record's per-process services, and the record as the API shows it.

Everything that happens in a conversation is an `EventRecord` in the events table — sources
`callback` (Tavus webhooks), `room` (what the bot saw), `bot` (interactions it sent), `llm`
(turns and their latency), `api` (what API clients asked for).
`ConversationService.add_events` is the one way in: it stores, and publishes each *newly* stored record's `as_dict()` on the conversation's
bus channel, which is what live-feed websockets stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from cvi_agent.bot.worker import Worker
from cvi_agent.bus import WORK_CHANNEL, Bus, events_channel, make_bus
from cvi_agent.config import Settings
from cvi_agent.conversations.delivery import Delivered, DeliveryError, InteractionDelivery, Via
from cvi_agent.conversations.ordering import make_turns
from cvi_agent.llm.brains.speech import clean_user_text, normalize
from cvi_agent.llm.recording import TurnRecorder
from cvi_agent.personas import Persona
from cvi_agent.protocol.interactions import Interaction
from cvi_agent.store import EventRecord, Leases, SqlStore, UtteranceRecord
from cvi_agent.tavus.client import TavusClient
from cvi_agent.tavus.ratelimit import RateLimiter, make_limiter

__all__ = ["ConversationService", "Delivered", "DeliveryError", "conversation_record"]

log = logging.getLogger(__name__)


@dataclass
class ConversationService:
    """The conversation record's per-process service: the one way events get in (stored once,
    then published on the conversation's bus channel), interactions delivered through Tavus's
    API or the conversation's bot wherever it runs (`delivery`), and the Tavus client.

    Built by `ConversationService.start` in the app's lifespan (routes reach it as
    `request.app.state.conversations`); `turns` records LLM turns off the hot path, and
    `leases` says which conversations want a bot. Everything on it is safe to share between
    the requests of one process; nothing in it is shared between processes except through
    the store and the bus.

    Args:
        settings: the process's settings.
        store: the database every record goes to.
        bus: fan-out of events (the live feed), commands to bots and worker wake-ups.
        personas: the loaded personas by name.
        worker: the in-process bot worker, when this process runs one (`CVI_RUN_WORKER`).
        _tavus: the Tavus client; leave it None: `tavus` creates it on first use.
        tavus_persona_ids: Tavus persona ids by `persona_name`, learned when pushing or
            looking them up (a cache for `POST /api/conversations`).
        redis_client: the Redis client of the interactions' ordering and of the Tavus rate limit,
            when `CVI_REDIS_URL` is set (closed by `aclose`).
    """

    settings: Settings
    store: SqlStore
    bus: Bus
    personas: dict[str, Persona]
    leases: Leases = field(init=False)
    turns: TurnRecorder = field(init=False)
    worker: Worker | None = None
    _tavus: TavusClient | None = None
    # Tavus persona ids by persona_name, learned when pushing or looking them up.
    tavus_persona_ids: dict[str, str] = field(default_factory=dict)
    redis_client: Redis | None = None
    limiter: RateLimiter = field(init=False)
    delivery: InteractionDelivery = field(init=False)

    def __post_init__(self) -> None:
        self.leases = Leases(self.store)
        self.turns = TurnRecorder(self.store, self.publish_many)
        s = self.settings
        self.limiter = make_limiter(
            s.tavus_rate_limit_rps, s.tavus_rate_limit_burst, self.redis_client
        )
        self.delivery = InteractionDelivery(
            settings=s,
            store=self.store,
            bus=self.bus,
            leases=self.leases,
            add_events=self.add_events,
            tavus=lambda: self.tavus,
            turns=make_turns(self.redis_client),
        )

    @classmethod
    async def start(
        cls,
        settings: Settings,
        store: SqlStore,
        personas: dict[str, Persona],
        *,
        run_worker: bool | None = None,
    ) -> ConversationService:
        """Connect the bus, start the turn recorder and (with `run_worker`, by default
        `CVI_RUN_WORKER`) an in-process worker; `aclose` undoes it all."""
        bus = make_bus(settings.redis_url)
        await bus.start()
        client = None
        if settings.redis_url:
            client = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
        record = cls(
            settings=settings, store=store, bus=bus, personas=personas, redis_client=client
        )
        record.turns.start()
        if settings.run_worker if run_worker is None else run_worker:
            record.worker = Worker.from_settings(
                settings, store=store, bus=bus, personas=personas, publish=record.publish
            )
            await record.worker.start()
        return record

    async def aclose(self) -> None:
        """Stop the worker (its leases given back), drain the turn recorder, close the bus,
        the interactions' clients, the Tavus client and Redis, in that order."""
        if self.worker is not None:
            await self.worker.aclose()
        await self.turns.aclose()
        await self.bus.aclose()
        await self.delivery.aclose()
        if self._tavus is not None:
            await self._tavus.aclose()
        if self.redis_client is not None:
            await self.redis_client.aclose()

    @property
    def tavus(self) -> TavusClient:
        """The Tavus client (created on first use; raises `TavusNotConfigured` without a key)."""
        if self._tavus is None:
            self._tavus = TavusClient(
                self.settings.tavus_api_key, self.settings.tavus_api_url, limiter=self.limiter
            )
        return self._tavus

    # -- the one way in ------------------------------------------------------------------------

    async def add_events(self, records: Sequence[EventRecord]) -> list[EventRecord]:
        """Store; publish what was new. Returns the new records (duplicates are absorbed)."""
        new = await self.store.add_events(records)
        await self.publish_many(new)
        return new

    async def publish_many(self, records: Sequence[EventRecord]) -> None:
        """`publish` each, in order: for records a caller stored itself (in its transaction)."""
        for record in records:
            await self.publish(record)

    async def publish(self, record: EventRecord) -> None:
        """Best effort: the event is already stored, and live consumers resync from the store."""
        if not record.conversation_id:
            return
        try:
            await self.bus.publish(events_channel(record.conversation_id), record.as_dict())
        except Exception as exc:
            log.warning("could not publish event %s on the bus: %s", record.id, exc)

    async def send_interaction(
        self,
        conversation_id: str,
        interaction: Interaction,
        request_id: str | None = None,
        *,
        via: Via | None = None,
        keyed: bool = False,
    ) -> Delivered:
        """Deliver an interaction through Tavus's API or the conversation's bot (`via`, by
        default `CVI_INTERACTIONS_VIA`); see `conversations/delivery.py`. `keyed`: the
        `request_id` is the caller's `Idempotency-Key`. Raises `DeliveryError` (404 unknown,
        409 ended, and every failure of the paths tried)."""
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None:
            raise DeliveryError(
                404, "conversation_not_found", f"No conversation {conversation_id!r}.", False
            )
        if conversation.status == "ended":
            raise DeliveryError(409, "conversation_ended", "The conversation has ended.", False)
        return await self.delivery.deliver(
            conversation, interaction, request_id, via=via, keyed=keyed
        )

    async def announce(self, conversation_id: str, interaction: Interaction) -> None:
        """For other modules (a ready video): best effort, never raises."""
        try:
            await self.send_interaction(conversation_id, interaction)
        except DeliveryError as exc:
            log.info(
                "%s not delivered to %s: %s", interaction.event_type, conversation_id, exc.message
            )

    async def wake_workers(self) -> None:
        """Tell every worker a conversation wants a bot now; best effort (workers also poll)."""
        try:
            await self.bus.publish(WORK_CHANNEL, {"op": "claim"})
        except Exception as exc:
            log.warning("could not wake workers (they will poll): %s", exc)


# -- the record as the API shows it ------------------------------------------------------------


def _replica_role(role: str) -> str:
    return "assistant" if role in ("replica", "assistant", "pal") else role


def join_transcript(
    transcript: list[dict[str, Any]] | None, utterances: Sequence[UtteranceRecord]
) -> dict[str, Any]:
    """Tavus's transcript, each line annotated with what the bot heard actually spoken.

    Tavus's `application.transcription_ready` lists what the LLM *meant* to say; the bot's
    `conversation.utterance.streaming` saw what was *spoken*, cut short when interrupted. Lines
    are matched by `inference_id` when both have one, else in order by text (an utterance's
    intended or spoken text equals the line, or is a prefix of it). With no Tavus transcript
    (yet), the bot's utterances are the transcript.
    """
    if transcript is None:
        return {
            "source": "bot" if utterances else None,
            "entries": [
                {
                    "role": _replica_role(u.role),
                    "content": u.intended_text if u.intended_text is not None else u.text,
                    "text": u.text,
                    "spoken_text": u.spoken_text,
                    "interrupted": bool(u.is_interrupted),
                    "inference_id": u.inference_id,
                    "turn_idx": u.turn_idx,
                }
                for u in utterances
            ],
        }
    by_inference = {
        (_replica_role(u.role), u.inference_id): u for u in utterances if u.inference_id
    }
    remaining = {
        role: [u for u in utterances if _replica_role(u.role) == role]
        for role in ("user", "assistant")
    }
    entries: list[dict[str, Any]] = []
    for line in transcript:
        if not isinstance(line, dict):
            continue
        role = str(line.get("role") or "")
        content = line.get("content")
        content_text = content if isinstance(content, str) else ""
        entry = dict(line)
        if role == "user":
            entry["text"] = clean_user_text(content_text)
        elif role == "assistant":
            entry["text"] = " ".join(content_text.split())
        match = None
        inference_id = line.get("inference_id")
        if inference_id and (role, inference_id) in by_inference:
            match = by_inference[(role, inference_id)]
        elif role in remaining:
            match = _match_by_text(entry.get("text", ""), remaining[role])
        if match is not None:
            if match in remaining.get(role, []):
                remaining[role].remove(match)
            entry["spoken_text"] = match.spoken_text
            entry["interrupted"] = bool(match.is_interrupted)
            entry["inference_id"] = entry.get("inference_id") or match.inference_id
            if role == "assistant" and match.spoken_text is not None:
                entry["text"] = match.spoken_text
        entries.append(entry)
    return {"source": "tavus", "entries": entries}


def _match_by_text(text: str, candidates: list[UtteranceRecord]) -> UtteranceRecord | None:
    said = normalize(text)
    if not said:
        return None
    for u in candidates:
        for option in (u.intended_text, u.spoken_text):
            if not option:
                continue
            other = normalize(option)
            if other and (other == said or said.startswith(other) or other.startswith(said)):
                return u
    return None


async def conversation_record(
    record: ConversationService, conversation_id: str, events_limit: int = 1000
) -> dict[str, Any] | None:
    """Everything about one conversation: record, transcript (joined), utterances, tool calls,
    answers, events, videos, and whether a bot is attached."""
    store = record.store
    conversation = await store.get_conversation(conversation_id)
    if conversation is None:
        return None
    transcript = await store.get_transcript(conversation_id)
    utterances = await store.list_utterances(conversation_id)
    events = await store.list_events(conversation_id, limit=events_limit + 1, order="id")
    more = len(events) > events_limit
    events = events[:events_limit]
    lease = await record.leases.get(conversation_id)
    return {
        "conversation": conversation.as_dict(),
        "transcript": join_transcript(transcript, utterances),
        "utterances": [u.as_dict() for u in utterances],
        "tool_calls": [t.as_dict() for t in await store.list_tool_calls(conversation_id)],
        "answers": await store.get_answers(conversation_id),
        "events": [e.as_dict() for e in events],
        "events_next_after": events[-1].id if more and events else None,
        "videos": [v.as_dict() for v in await store.list_videos(conversation_id)],
        "bot": lease.as_dict() if lease is not None else None,
    }
