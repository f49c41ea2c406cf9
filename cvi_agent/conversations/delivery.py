"""Interactions reach the replica one of two ways, behind one API.

- **rest**: Tavus's `POST /v2/conversations/{id}/send-app-message` (header `x-api-key`, body the
  interaction message). Needs no participant in the room: it works before the bot joins, while
  it is taken over, or with no bot at all. Tavus hands it to the replica and does not broadcast
  it into the call, so the room (and our bot) never sees it: the record stores each one as an
  `api` event `interaction.<event_type>` with its path, outcome and Tavus's answer.
- **bot**: the message goes over the bus to the worker running the conversation's bot, which
  sends it into the room as a Daily app-message and records it (source `bot`).

`CVI_INTERACTIONS_VIA` (or `?via=` per request) chooses: `rest`, `bot`, or `auto` (the
default): REST for a Tavus conversation when `TAVUS_API_KEY` is set, the bot otherwise and for
local rooms (`ws://`). With `auto`, a failure that surely did not deliver (502 after retries,
connection refused, 429 past the budget, no bot in the room, the bot could not send) is tried
once on the other path when that path is there; a failure that may have delivered is not.

Semantics, per conversation: interactions leave in the order they were accepted, one at a time,
across processes with Redis (`ordering.py`); each waits at most `CVI_INTERACTION_BUDGET` in
our hands (its turn, rate-limit slots, `Retry-After`, backoff). A body over the path's limit
is a 413 before anything is sent (65,536 bytes for REST; 4,096 for the bot, Daily's app-message
limit). A 504 or an unanswered REST call is `202 delivery: "uncertain"`, recorded as such,
and never retried by us. With an `Idempotency-Key`, the outcome is stored under the key
(inside the conversation's turn), so a retried request is answered from it and nothing is sent
twice, whichever path delivered the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from cvi_agent.bus import Bus, BusUnavailable, commands_channel, request
from cvi_agent.config import Settings
from cvi_agent.conversations.ordering import LocalTurns, TurnTimeout
from cvi_agent.protocol.interactions import Interaction
from cvi_agent.store import ConversationRecord, EventRecord, Leases, SqlStore
from cvi_agent.store.base import now
from cvi_agent.tavus.client import (
    APP_MESSAGE_MAX_BYTES,
    TavusAuthError,
    TavusBadRequest,
    TavusClient,
    TavusConversationEnded,
    TavusDeliveryUncertain,
    TavusError,
    TavusNotConfigured,
    TavusNotDelivered,
    TavusNotFound,
    TavusPayloadTooLarge,
    TavusRateLimited,
)
from cvi_agent.tavus.ratelimit import seconds

log = logging.getLogger(__name__)

Via = Literal["auto", "rest", "bot"]
DeliveryPath = Literal["rest", "bot"]
VIAS: tuple[str, ...] = ("auto", "rest", "bot")

# Daily app-messages must be within 4 KB (daily's `sendAppMessage` reference); daily-python
# sends through the same core, so the bot path refuses larger messages before sending.
BOT_MESSAGE_MAX_BYTES = 4096
REST_MESSAGE_MAX_BYTES = APP_MESSAGE_MAX_BYTES
LIMITS: dict[str, int] = {"rest": REST_MESSAGE_MAX_BYTES, "bot": BOT_MESSAGE_MAX_BYTES}
_MAX_STANDINS = 16

AddEvents = Callable[[Sequence[EventRecord]], Awaitable[list[EventRecord]]]


class DeliveryError(Exception):
    """An interaction that was not delivered; `status`/`code` as the API answers it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retryable: bool,
        *,
        retry_after: float | None = None,
        fallback: bool = False,
    ) -> None:
        """One failed delivery, as the API will answer it.

        Args:
            status: the HTTP status (400, 404, 409, 413, 429, 502 or 503).
            code: the error's `code` (`bot_not_attached`, `tavus_not_delivered`, …).
            message: for the API user; safe to show.
            retryable: whether a retry may succeed (the API then adds `Retry-After`).
            retry_after: seconds to wait before retrying, when known (else 1).
            fallback: it surely was not delivered and the other path may try (with `auto`).
        """
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.fallback = fallback

    def headers(self) -> dict[str, str] | None:
        """`Retry-After` for a retryable error, in whole seconds."""
        if not self.retryable:
            return None
        return {"Retry-After": str(seconds(self.retry_after or 1))}


@dataclass
class Delivered:
    """What the API answers for an interaction that left: `200` delivered, `202` uncertain.

    Args:
        via: the path that delivered it (`rest` or `bot`).
        delivery: `delivered`, or `uncertain` (Tavus answered 504, or did not answer once it
            was sent: it may have reached the replica; check before sending it again).
        request_id: the caller's `Idempotency-Key`, or one we made up.
        message: the exact Interactions-Protocol message sent.
        worker: the worker whose bot sent it (bot path).
        tavus: Tavus's answer (REST path): its body, or its error.
        http_status: the HTTP status Tavus answered (REST path; None without an answer).
        attempts: sends it took (REST: more than one after a 429 or a 502).
        latency_ms: from accepted to answered, waiting for its turn included.
        fallback_from: the path that failed first (surely without delivering), with `auto`.
        replayed: answered from the record of an earlier request with the same key.
    """

    via: str
    delivery: str
    request_id: str
    message: dict[str, Any]
    worker: str | None = None
    tavus: Any = None
    http_status: int | None = None
    attempts: int = 1
    latency_ms: float = 0.0
    fallback_from: str | None = None
    replayed: bool = False

    @property
    def status(self) -> int:
        """The HTTP status of the API's answer."""
        return 200 if self.delivery == "delivered" else 202

    def record(self) -> dict[str, Any]:
        """What the record keeps about the delivery (the event's `delivery` field)."""
        return {
            "via": self.via,
            "status": self.delivery,
            "http_status": self.http_status,
            "tavus": self.tavus,
            "worker": self.worker,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "fallback_from": self.fallback_from,
            "request_id": self.request_id,
        }

    def as_dict(self) -> dict[str, Any]:
        """The API's answer."""
        return {
            "delivered": True if self.delivery == "delivered" else None,
            "delivery": self.delivery,
            "via": self.via,
            "request_id": self.request_id,
            "message": self.message,
            "worker": self.worker,
            "tavus": self.tavus,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "fallback_from": self.fallback_from,
            "replayed": self.replayed,
        }


def is_local(conversation: ConversationRecord) -> bool:
    """A local room (`ws://`, the simulator's and tests'): Tavus's API cannot reach it."""
    return (conversation.conversation_url or "").startswith(("ws://", "wss://"))


def standin_url(conversation: ConversationRecord) -> str | None:
    """The stand-in for Tavus's API an attached conversation named (`interactions_url`)."""
    value = conversation.meta.get("interactions_url")
    return value if isinstance(value, str) and value else None


def check_standin_url(url: str) -> str | None:
    """Why `url` cannot be a stand-in for Tavus's API, or None when it can: http(s) on a
    loopback address only, so no caller can make us post interactions anywhere else."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL"
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return "must be on this machine (a loopback address)"


def encode_message(message: dict[str, Any]) -> bytes:
    """The exact bytes sent (compact JSON, UTF-8), so the size checked is the size sent."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class InteractionDelivery:
    """Delivers interactions through the chosen path (module doc), in order, within a budget.

    Args:
        settings: `CVI_INTERACTIONS_VIA`, `CVI_INTERACTION_BUDGET`, `CVI_INTERACTION_TIMEOUT`,
            `TAVUS_API_KEY`.
        store: where REST deliveries are recorded and idempotency keys looked up.
        bus: commands to the conversations' bots and their replies.
        leases: which conversations have a bot (and whether it is in the room).
        add_events: stores and publishes records (`ConversationService.add_events`).
        tavus: the process's Tavus client (created on first use).
        turns: per-conversation ordering (`ordering.make_turns`).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: SqlStore,
        bus: Bus,
        leases: Leases,
        add_events: AddEvents,
        tavus: Callable[[], TavusClient],
        turns: LocalTurns,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.leases = leases
        self.add_events = add_events
        self.tavus = tavus
        self.turns = turns
        self._standins: OrderedDict[str, TavusClient] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Close the stand-in clients and the turns (the Tavus client is its owner's)."""
        for client in self._standins.values():
            await client.aclose()
        self._standins.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.turns.aclose()

    # -- choosing -------------------------------------------------------------------------------

    def rest_available(self, conversation: ConversationRecord) -> bool:
        """Tavus's API can reach this conversation: a stand-in was named, or it is a Tavus
        conversation (not a local room) and `TAVUS_API_KEY` is set."""
        if standin_url(conversation):
            return True
        return not is_local(conversation) and bool(self.settings.tavus_api_key)

    async def plan(self, conversation: ConversationRecord, via: Via) -> list[DeliveryPath]:
        """The paths to try, in order (module doc); raises `DeliveryError` when `via` names a
        path this conversation does not have."""
        if via == "bot":
            return ["bot"]
        rest = self.rest_available(conversation)
        if via == "rest":
            if rest:
                return ["rest"]
            if is_local(conversation):
                raise DeliveryError(
                    409,
                    "rest_unavailable",
                    "This conversation is in a local room: Tavus's API cannot reach it "
                    "(attach it with an `interactions_url` stand-in, or use via=bot).",
                    False,
                )
            raise DeliveryError(503, "tavus_not_configured", "TAVUS_API_KEY is not set.", False)
        lease = await self.leases.get(conversation.id)
        primary: DeliveryPath = "rest" if rest and not is_local(conversation) else "bot"
        if primary == "bot" and lease is None and rest:
            return ["rest"]  # no bot will ever be there: go straight to the API
        other: DeliveryPath = "bot" if primary == "rest" else "rest"
        if (other == "bot" and lease is not None) or (other == "rest" and rest):
            return [primary, other]
        return [primary]

    # -- delivering -----------------------------------------------------------------------------

    async def deliver(
        self,
        conversation: ConversationRecord,
        interaction: Interaction,
        request_id: str | None = None,
        *,
        via: Via | None = None,
        keyed: bool = False,
    ) -> Delivered:
        """Deliver one interaction; returns how (`Delivered`), raises `DeliveryError`.

        `keyed`: `request_id` is the caller's `Idempotency-Key`: the outcome is stored under
        it, and a repeat is answered from the store without sending anything."""
        accepted = time.monotonic()
        request_id = request_id or uuid.uuid4().hex
        cid = conversation.id
        message = interaction.to_message(cid)
        body = encode_message(message)
        paths = await self.plan(conversation, via or self.settings.interactions_via)
        fitting = [p for p in paths if len(body) <= LIMITS[p]]
        if not fitting:
            path = paths[0]
            raise DeliveryError(
                413,
                "interaction_too_large",
                f"The interaction is {len(body):,} bytes; the {path} path takes at most "
                f"{LIMITS[path]:,}"
                + (" (Daily's app-message limit)." if path == "bot" else " (Tavus's limit)."),
                False,
            )
        budget = self.settings.interaction_budget
        try:
            async with self.turns.turn(cid, budget):
                if keyed:
                    earlier = await self._replay(cid, request_id)
                    if earlier is not None:
                        return earlier
                failures: list[tuple[DeliveryPath, DeliveryError]] = []
                for index, path in enumerate(fitting):
                    left = max(0.0, budget - (time.monotonic() - accepted))
                    try:
                        if path == "rest":
                            done = await self._via_rest(
                                conversation, message, body, request_id, left
                            )
                        else:
                            done = await self._via_bot(cid, interaction, message, request_id)
                    except DeliveryError as exc:
                        failures.append((path, exc))
                        if not exc.fallback or index == len(fitting) - 1:
                            break
                        log.info(
                            "%s for %s not delivered through %s (%s); trying %s",
                            message["event_type"],
                            cid,
                            path,
                            exc.code,
                            fitting[index + 1],
                        )
                        continue
                    done.latency_ms = round((time.monotonic() - accepted) * 1000, 1)
                    done.fallback_from = fitting[0] if index else None
                    await self._remember(conversation, done, keyed)
                    return done
                raise _combined(failures)
        except TurnTimeout as exc:
            raise DeliveryError(
                503,
                "interaction_queue_timeout",
                f"Earlier interactions of this conversation did not leave within {budget:g} s "
                f"({exc}); retry shortly.",
                True,
            ) from None

    async def _replay(self, cid: str, request_id: str) -> Delivered | None:
        """The outcome stored under this idempotency key, if a request with it got that far."""
        event = await self.store.find_event("api", _key(cid, request_id))
        if event is None:
            return None
        payload = dict(event.payload)
        delivery = payload.pop("delivery", None) or {}
        return Delivered(
            via=str(delivery.get("via") or ""),
            delivery=str(delivery.get("status") or "uncertain"),
            request_id=request_id,
            message=payload,
            worker=delivery.get("worker"),
            tavus=delivery.get("tavus"),
            http_status=delivery.get("http_status"),
            attempts=int(delivery.get("attempts") or 1),
            latency_ms=float(delivery.get("latency_ms") or 0.0),
            fallback_from=delivery.get("fallback_from"),
            replayed=True,
        )

    async def _remember(
        self, conversation: ConversationRecord, done: Delivered, keyed: bool
    ) -> None:
        """The record of what left: every REST delivery (the room never sees it), and a bot
        delivery made under an idempotency key (so a retry is answered, whatever the path)."""
        if done.via == "bot" and not keyed:
            return  # the bot recorded what it sent
        kind = (
            "interaction." + done.message["event_type"]
            if done.via == "rest"
            else ("interaction.delivered")
        )
        dedupe = (
            _key(conversation.id, done.request_id)
            if keyed
            else (f"interaction|{conversation.id}|{uuid.uuid4().hex}")
        )
        record = EventRecord(
            conversation_id=conversation.id,
            source="api",
            kind=kind,
            dedupe_key=dedupe,
            payload=dict(done.message, delivery=done.record()),
            occurred_at=now(),
        )
        try:
            await self.add_events([record])
        except Exception as exc:
            # It left: the caller must hear so, or they would send it again.
            log.warning(
                "%s for %s was delivered (%s) but not recorded: %s",
                done.message["event_type"],
                conversation.id,
                done.via,
                exc,
            )

    # -- the REST path --------------------------------------------------------------------------

    def _rest_client(self, conversation: ConversationRecord) -> TavusClient:
        url = standin_url(conversation)
        if url is None:
            return self.tavus()
        client = self._standins.get(url)
        if client is None:
            client = TavusClient("", url, keyless=True, backoff=0.1, max_backoff=2.0)
            self._standins[url] = client
            while len(self._standins) > _MAX_STANDINS:
                _, old = self._standins.popitem(last=False)
                task = asyncio.get_running_loop().create_task(old.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        else:
            self._standins.move_to_end(url)
        return client

    async def _via_rest(
        self,
        conversation: ConversationRecord,
        message: dict[str, Any],
        body: bytes,
        request_id: str,
        budget: float,
    ) -> Delivered:
        cid = conversation.id
        try:
            sent = await self._rest_client(conversation).send_app_message(
                cid, body, budget=budget, attempt_timeout=self.settings.interaction_timeout
            )
        except TavusDeliveryUncertain as exc:
            log.warning(
                "%s for %s may not have been delivered: %s", message["event_type"], cid, exc
            )
            return Delivered(
                via="rest",
                delivery="uncertain",
                request_id=request_id,
                message=message,
                tavus=exc.body if exc.body is not None else {"error": exc.message},
                http_status=exc.status or None,
                attempts=exc.attempts,
            )
        except TavusError as exc:
            error = _rest_error(exc)
            await self._record_failure(cid, message, request_id, exc, error)
            raise error from None
        return Delivered(
            via="rest",
            delivery="delivered",
            request_id=request_id,
            message=message,
            tavus=sent.body,
            http_status=sent.status,
            attempts=sent.attempts,
        )

    async def _record_failure(
        self,
        cid: str,
        message: dict[str, Any],
        request_id: str,
        exc: TavusError,
        error: DeliveryError,
    ) -> None:
        """A REST interaction that did not leave is in the record too (it never reached the
        room, so nothing else would show it)."""
        if exc.attempts == 0 and isinstance(exc, TavusRateLimited | TavusNotConfigured):
            return  # refused here before anything was sent
        with contextlib.suppress(Exception):  # the answer matters more than this note
            await self.add_events(
                [
                    EventRecord(
                        conversation_id=cid,
                        source="api",
                        kind="interaction.error",
                        dedupe_key=f"interaction-error|{cid}|{uuid.uuid4().hex}",
                        payload={
                            "event_type": message["event_type"],
                            "via": "rest",
                            "code": error.code,
                            "error": exc.message,
                            "http_status": exc.status or None,
                            "tavus": exc.body,
                            "attempts": exc.attempts,
                            "request_id": request_id,
                        },
                        occurred_at=now(),
                    )
                ]
            )

    # -- the bot path ---------------------------------------------------------------------------

    async def _via_bot(
        self, cid: str, interaction: Interaction, message: dict[str, Any], request_id: str
    ) -> Delivered:
        reply = await self.send_to_bot(cid, interaction, request_id)
        return Delivered(
            via="bot",
            delivery="delivered",
            request_id=request_id,
            message=reply.get("message") or message,
            worker=reply.get("worker"),
        )

    async def send_to_bot(
        self, conversation_id: str, interaction: Interaction, request_id: str
    ) -> dict[str, Any]:
        """Hand the interaction to the conversation's bot, wherever its worker runs, and wait
        for the bot to confirm it sent it into the room. Returns the bot's reply; raises
        `DeliveryError` (409 no bot attached; 503 starting / unreachable / no confirmation)."""
        lease = await self.leases.get(conversation_id)
        if lease is None:
            raise DeliveryError(
                409,
                "bot_not_attached",
                "No bot is attached to this conversation (none was started, or it has left).",
                False,
                fallback=True,
            )
        if not lease.held():
            raise DeliveryError(
                503,
                "bot_starting",
                "The conversation's bot is starting (or being taken over); retry shortly.",
                True,
                fallback=True,
            )
        command = {
            "op": "send",
            "interaction": interaction.model_dump(mode="json", exclude={"event_type"}),
        }
        try:
            receivers, reply = await request(
                self.bus,
                commands_channel(conversation_id),
                command,
                request_id,
                self.settings.interaction_timeout,
            )
        except BusUnavailable as exc:
            raise DeliveryError(
                503,
                "bus_unavailable",
                f"The event bus is unavailable ({exc}).",
                True,
                fallback=True,
            ) from None
        if receivers == 0:
            raise DeliveryError(
                503,
                "bot_unavailable",
                "The conversation's bot is not reachable right now; retry shortly.",
                True,
                fallback=True,
            )
        if reply is None:
            raise DeliveryError(
                503,
                "bot_timeout",
                "The conversation's bot did not confirm in time; retry with the same "
                "Idempotency-Key to avoid sending twice.",
                True,
            )
        if not reply.get("ok"):
            code = str(reply.get("code") or "send_failed")
            status = 400 if code == "invalid_interaction" else 503
            raise DeliveryError(
                status,
                code,
                f"The bot could not send it: {reply.get('error')}",
                status == 503,
                fallback=status == 503,
            )
        return reply


def _key(cid: str, request_id: str) -> str:
    """The dedupe key an idempotency key's outcome is stored under."""
    return f"interaction|{cid}|{request_id}"


def _rest_error(exc: TavusError) -> DeliveryError:
    """A failed send-app-message as our answer; `fallback` where it surely did not deliver."""
    if isinstance(exc, TavusConversationEnded):
        return DeliveryError(409, "conversation_ended", f"Tavus: {exc.message}", False)
    if isinstance(exc, TavusPayloadTooLarge):
        return DeliveryError(413, "interaction_too_large", f"Tavus: {exc.message}", False)
    if isinstance(exc, TavusRateLimited):
        return DeliveryError(
            429,
            "tavus_rate_limited",
            f"Tavus rate limit: {exc.message}",
            True,
            retry_after=exc.retry_after,
            fallback=True,
        )
    if isinstance(exc, TavusNotConfigured):
        return DeliveryError(
            503, "tavus_not_configured", "TAVUS_API_KEY is not set.", False, fallback=True
        )
    if isinstance(exc, TavusAuthError):
        return DeliveryError(
            502,
            "tavus_auth_failed",
            f"Tavus rejected TAVUS_API_KEY: {exc.message}",
            False,
            fallback=True,
        )
    if isinstance(exc, TavusBadRequest):
        return DeliveryError(400, "tavus_bad_request", f"Tavus refused it: {exc.message}", False)
    if isinstance(exc, TavusNotFound):
        return DeliveryError(404, "tavus_not_found", f"Tavus: {exc.message}", False, fallback=True)
    if isinstance(exc, TavusNotDelivered):
        return DeliveryError(
            502,
            "tavus_not_delivered",
            f"Tavus could not deliver it after {exc.attempts} attempt(s): {exc.message}",
            True,
            retry_after=exc.retry_after,
            fallback=True,
        )
    return DeliveryError(502, "tavus_unavailable", f"Tavus: {exc.message}", True, fallback=True)


def _combined(failures: list[tuple[DeliveryPath, DeliveryError]]) -> DeliveryError:
    """What to answer when every path failed: the last path's error when it may matter more
    than the first (it may have delivered, or the conversation is over), else the first
    path's, saying the other was tried too."""
    _, first = failures[0]
    if len(failures) == 1:
        return first
    last_path, last = failures[-1]
    if not last.fallback:
        return last
    first.message = f"{first.message} (also tried through {last_path}: {last.code}: {last.message})"
    return first
