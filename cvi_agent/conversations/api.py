"""`/api/conversations…`: list, get, create (on Tavus, with a bot), interactions, end, live feed.

Same keys as the LLM endpoint (`Authorization: Bearer K` or `x-api-key: K`; on the websocket
also `?key=K` or the subprotocol `bearer.K` / `key.K`, since browsers cannot set headers there). Every
error is in the OpenAI error shape.

Interactions reach the replica through Tavus's send-app-message API or through the
conversation's bot wherever its worker runs (`conversations/delivery.py` chooses, delivers in
order and records); the answer says which path delivered it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import uuid
from typing import Any, cast

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cvi_agent.bus import BusUnavailable
from cvi_agent.config import Settings
from cvi_agent.conversations.callbacks import callback_url, stop_bot
from cvi_agent.conversations.delivery import VIAS, Via, check_standin_url
from cvi_agent.conversations.deps import conversations_of, require_conversations
from cvi_agent.conversations.feed import MAX_EVENT_ID, Live, event_feed
from cvi_agent.conversations.service import ConversationService, DeliveryError, conversation_record
from cvi_agent.protocol.interactions import InteractionRequest
from cvi_agent.protocol.redact import redact_url
from cvi_agent.rooms.policy import RoomPolicy, RoomRefused
from cvi_agent.store import ConversationRecord, EventRecord
from cvi_agent.store.base import now
from cvi_agent.tavus.client import (
    TavusAuthError,
    TavusBadRequest,
    TavusError,
    TavusNotConfigured,
    TavusNotFound,
    TavusRateLimited,
)
from cvi_agent.web.auth import constant_time_in, require_key
from cvi_agent.web.body import read_json_object
from cvi_agent.web.errors import ApiError, validation_message
from cvi_agent.web.security import deny_websocket

log = logging.getLogger(__name__)

WS_PROTOCOL = "cvi-agent"
_AFTER_RANGE = f"after must be an event id (0 to {MAX_EVENT_ID})."
_KEY_PROTOCOL_PREFIXES = ("bearer.", "key.")


router = APIRouter(prefix="/api/conversations", tags=["conversations"])
_auth = [Depends(require_key)]


def _record(request: Request) -> ConversationService:
    return require_conversations(request.app.state)


async def _conversation(record: ConversationService, conversation_id: str) -> ConversationRecord:
    conversation = await record.store.get_conversation(conversation_id)
    if conversation is None:
        raise ApiError(404, f"No conversation {conversation_id!r}.", "conversation_not_found", "id")
    return conversation


def tavus_api_error(exc: TavusError) -> ApiError:
    """A Tavus failure as our error: the caller's fault (400), ours (502/503), or a rate limit."""
    if isinstance(exc, TavusNotConfigured):
        return ApiError(503, "TAVUS_API_KEY is not configured.", "tavus_not_configured")
    if isinstance(exc, TavusBadRequest):
        return ApiError(400, f"Tavus refused the request: {exc.message}", "tavus_bad_request")
    if isinstance(exc, TavusAuthError):
        return ApiError(502, f"Tavus rejected TAVUS_API_KEY: {exc.message}", "tavus_auth_failed")
    if isinstance(exc, TavusNotFound):
        return ApiError(404, f"Tavus: {exc.message}", "tavus_not_found")
    if isinstance(exc, TavusRateLimited):
        retry = str(int(exc.retry_after or 1))
        return ApiError(
            429,
            f"Tavus rate limit: {exc.message}",
            "tavus_rate_limited",
            headers={"Retry-After": retry},
        )
    return ApiError(502, f"Tavus is unavailable: {exc.message}", "tavus_unavailable")


# -- list and get ------------------------------------------------------------------------------


def _encode_cursor(conversation: ConversationRecord) -> str:
    raw = json.dumps([conversation.created_at, conversation.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    """What `_encode_cursor` made, or a 400: anything the database cannot bind (a NaN, an
    escaped lone surrogate, a NUL) is refused here, not a 500 there."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, cid = json.loads(raw)
        if not isinstance(cid, str) or "\x00" in cid or isinstance(created_at, bool):
            raise ValueError("not one of our cursors")
        cid.encode("utf-8")  # an escaped lone surrogate cannot be encoded (UnicodeError)
        before = float(created_at)
        if not math.isfinite(before):
            raise ValueError("not one of our cursors")
        return before, cid
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ApiError(400, "Invalid cursor.", "invalid_cursor", "cursor") from None


@router.get("", dependencies=_auth, summary="Conversations, newest first (cursor pagination)")
async def list_conversations(
    request: Request, limit: int = 50, cursor: str | None = None
) -> dict[str, Any]:
    """A page of conversations, newest first, `limit` (1–200) at a time.

    Each item is the conversation's row: `id`, `persona`, `status` (`active`, `live` once the
    replica joined, `ended`), `conversation_url`, `shutdown_reason`, `meta`, timestamps, and
    `last_event_at` (when its latest event arrived; null without events); `now` is the
    server's clock, to tell how long each has been quiet. When `has_more` is true, pass
    `next_cursor` back as `cursor` for the next page; the cursor is stable while new
    conversations are created.
    """
    record = _record(request)
    if not 1 <= limit <= 200:
        raise ApiError(400, "limit must be between 1 and 200.", "invalid_limit", "limit")
    before, before_id = _decode_cursor(cursor) if cursor else (None, None)
    rows = await record.store.list_conversations(limit + 1, before, before_id)
    more = len(rows) > limit
    rows = rows[:limit]
    latest = await record.store.last_event_times([c.id for c in rows])
    return {
        "object": "list",
        "data": [{**c.as_dict(), "last_event_at": latest.get(c.id)} for c in rows],
        "now": now(),
        "has_more": more,
        "next_cursor": _encode_cursor(rows[-1]) if more and rows else None,
    }


@router.get("/{conversation_id}", dependencies=_auth, summary="One conversation's whole record")
async def get_conversation(request: Request, conversation_id: str) -> dict[str, Any]:
    """Everything recorded about one conversation, joined.

    `conversation` (its row), `transcript` (Tavus's, each line with what the bot heard
    actually spoken: `spoken_text`, `interrupted`; without a Tavus transcript, the bot's
    utterances), `utterances`, `tool_calls`, `answers` (a questionnaire's), the first 1000
    `events` (`events_next_after` pages on with `GET …/events?after=`), `videos`, and `bot`
    (its lease, or null when no bot is wanted). 404 `conversation_not_found`.
    """
    record = _record(request)
    body = await conversation_record(record, conversation_id)
    if body is None:
        raise ApiError(404, f"No conversation {conversation_id!r}.", "conversation_not_found", "id")
    return body


@router.get("/{conversation_id}/events", dependencies=_auth, summary="Events, in arrival order")
async def list_events(
    request: Request, conversation_id: str, after: int = 0, limit: int = 500
) -> dict[str, Any]:
    """The conversation's events in arrival order (by id), after the event id `after`,
    `limit` (1–1000) per page; `next_after` is the `after` of the next page (null at the end).

    Every source is here: `callback` (Tavus webhooks), `room` (what the bot saw), `bot` (what
    it sent, its lifecycle), `llm` (one `llm.turn` per chat completion), `api`, `video`.
    """
    record = _record(request)
    await _conversation(record, conversation_id)
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be between 1 and 1000.", "invalid_limit", "limit")
    if not 0 <= after <= MAX_EVENT_ID:
        raise ApiError(400, _AFTER_RANGE, "invalid_after", "after")
    events = await record.store.list_events(
        conversation_id, after_id=after, limit=limit + 1, order="id"
    )
    more = len(events) > limit
    events = events[:limit]
    return {
        "object": "list",
        "data": [e.as_dict() for e in events],
        "next_after": events[-1].id if more and events else None,
    }


# -- create ------------------------------------------------------------------------------------


class CreateConversation(BaseModel):
    """Body of `POST /api/conversations` (Tavus's fields, plus which persona and the bot)."""

    model_config = ConfigDict(extra="forbid")

    persona: str | None = Field(default=None, description="one of our personas (its `name`)")
    persona_id: str | None = Field(default=None, description="a Tavus persona id, instead")
    replica_id: str | None = None
    conversation_name: str | None = None
    conversational_context: str | None = None
    custom_greeting: str | None = None
    test_mode: bool | None = None
    require_auth: bool | None = None
    max_participants: int | None = Field(default=None, ge=2, le=100)
    properties: dict[str, Any] | None = None
    bot: bool = Field(default=True, description="start a bot in the conversation's room")
    conversation_url: str | None = Field(
        default=None,
        max_length=2048,
        description="attach to an existing room instead of creating on Tavus "
        "(a Daily URL on CVI_ROOM_HOSTS, or a ws:// local room with CVI_LOCAL_ROOMS)",
    )
    conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:\-]+$",
        description="with conversation_url: the id of the existing conversation",
    )
    meeting_token: str | None = Field(default=None, max_length=4096)
    interactions_url: str | None = Field(
        default=None,
        max_length=2048,
        description="with conversation_url: a stand-in for Tavus's API on this machine (the "
        "simulator's) that takes this conversation's REST interactions",
    )


async def _tavus_persona_id(record: ConversationService, name: str) -> str:
    persona = record.personas[name]
    known = record.tavus_persona_ids.get(persona.persona_name)
    if known:
        return known
    tavus = record.tavus
    found = await tavus.find_persona(persona.persona_name)
    if found is not None and found.get("persona_id"):
        persona_id = str(found["persona_id"])
    else:
        if not record.settings.api_keys:
            raise ApiError(503, "No API key to give Tavus: set CVI_API_KEYS.", "no_api_key")
        pushed = await tavus.push_persona(
            persona, record.settings.public_url, record.settings.api_keys[0]
        )
        persona_id = pushed.persona_id
        log.info("pushed persona %s to Tavus as %s", name, persona_id)
    record.tavus_persona_ids[persona.persona_name] = persona_id
    return persona_id


@router.post("", dependencies=_auth, status_code=201, summary="Create on Tavus and start a bot")
async def create_conversation(request: Request) -> JSONResponse:
    """Create a conversation on Tavus with one of our personas, and start a bot in its room.

    The persona is pushed to Tavus first if Tavus does not know it (or pass a Tavus
    `persona_id`). The conversation gets our `callback_url`, and `max_participants` of at
    least 3 when a bot joins (the user, the replica and the bot). With `conversation_url`
    (and optionally `conversation_id`), Tavus is not called: an existing room is recorded and
    a bot is sent into it. 201 with the conversation, its URL and whether a bot was
    requested; the bot joins within moments, from whichever worker claims it. 400 for an
    invalid body, 404 for an unknown `persona`. A bot only joins rooms on the allow-list:
    `CVI_ROOM_HOSTS` (default Daily's `*.daily.co`), and `ws://` local rooms on this machine
    with `CVI_LOCAL_ROOMS`; another `conversation_url` is a 400 `room_not_allowed` naming the
    setting (a URL Tavus returns outside it gets no bot: `bot.refused` says why). Tavus's refusals are passed on: 400 with its
    message, 429 with `Retry-After`, 502 for a bad `TAVUS_API_KEY` or a Tavus outage, 503
    without a key.
    """
    record = _record(request)
    raw = await read_json_object(request, record.settings.max_body_bytes)
    try:
        body = CreateConversation.model_validate(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise ApiError(400, message, "invalid_request", param) from None
    if not body.persona and not body.persona_id:
        raise ApiError(400, "Give `persona` (one of ours) or `persona_id`.", "missing_persona")
    if body.persona is not None and body.persona not in record.personas:
        raise ApiError(
            404,
            f"No persona {body.persona!r} ({', '.join(sorted(record.personas))}).",
            "persona_not_found",
            "persona",
        )
    if body.bot and body.max_participants is not None and body.max_participants < 3:
        raise ApiError(
            400,
            "max_participants must be at least 3 when a bot joins (the user, the replica and "
            "the bot).",
            "invalid_max_participants",
            "max_participants",
        )
    if body.conversation_url is not None:
        return await _attach_conversation(record, body)
    if body.interactions_url is not None:
        raise ApiError(
            400,
            "interactions_url goes with conversation_url.",
            "invalid_request",
            "interactions_url",
        )
    cb_url = callback_url(record.settings)
    try:
        persona_id = body.persona_id or await _tavus_persona_id(record, body.persona or "")
        tavus_body: dict[str, Any] = body.model_dump(exclude_none=True, exclude={"persona", "bot"})
        tavus_body["persona_id"] = persona_id
        tavus_body["callback_url"] = cb_url
        if body.bot:  # the bot is a participant too: the user, the replica and the bot
            tavus_body["max_participants"] = max(body.max_participants or 0, 3)
        created = await record.tavus.create_conversation(tavus_body)
    except TavusError as exc:
        raise tavus_api_error(exc) from None
    cid = str(created.get("conversation_id") or "")
    if not cid:
        raise ApiError(502, "Tavus returned no conversation_id.", "tavus_bad_response")
    url = created.get("conversation_url")
    shown = {k: v for k, v in created.items() if k != "meeting_token"}
    if "callback_url" in shown:
        shown["callback_url"] = redact_url(shown["callback_url"])
    await record.store.upsert_conversation(
        cid,
        persona=body.persona,
        conversation_url=url,
        meta={"tavus": shown, "persona_id": persona_id, "bot_requested": body.bot},
    )
    await record.add_events(
        [
            EventRecord(
                conversation_id=cid,
                source="api",
                kind="conversation.created",
                dedupe_key=f"created|{cid}",
                payload=shown,
                occurred_at=now(),
            )
        ]
    )
    bot: dict[str, Any] = {"requested": bool(body.bot and url)}
    if body.bot and url:
        try:  # Tavus hands out Daily URLs; any other is held to the same allow-list
            RoomPolicy.from_settings(record.settings).check(str(url))
        except RoomRefused as exc:
            log.warning("conversation %s: no bot sent: %s", cid, exc)
            bot = {"requested": False, "refused": str(exc)}
    if bot["requested"]:
        await record.leases.offer(
            cid,
            {
                "conversation_url": url,
                "meeting_token": created.get("meeting_token"),
                "persona": body.persona,
            },
        )
        await record.wake_workers()
    conversation = await _conversation(record, cid)
    return JSONResponse(
        {
            "conversation": conversation.as_dict(),
            "conversation_url": url,
            "tavus": shown,
            "bot": bot,
        },
        status_code=201,
    )


async def _attach_conversation(
    record: ConversationService, body: CreateConversation
) -> JSONResponse:
    """A conversation that already exists (created on Tavus by someone else, or a local room):
    record it and start a bot in its room, without calling Tavus."""
    url = body.conversation_url or ""
    if body.bot:
        try:
            RoomPolicy.from_settings(record.settings).check(url)
        except RoomRefused as exc:
            raise ApiError(400, str(exc), "room_not_allowed", "conversation_url") from None
    elif not url.startswith(("https://", "http://", "ws://", "wss://")):
        raise ApiError(
            400,
            "conversation_url must be an http(s) or ws(s) URL.",
            "invalid_url",
            "conversation_url",
        )
    meta: dict[str, Any] = {"attached": True, "bot_requested": body.bot}
    if body.interactions_url is not None:
        why = check_standin_url(body.interactions_url)
        if why is not None:
            raise ApiError(400, f"interactions_url {why}.", "invalid_url", "interactions_url")
        meta["interactions_url"] = body.interactions_url
    cid = body.conversation_id or "local-" + secrets.token_hex(6)
    await record.store.upsert_conversation(
        cid, persona=body.persona, conversation_url=redact_url(url), meta=meta
    )
    await record.add_events(
        [
            EventRecord(
                conversation_id=cid,
                source="api",
                kind="conversation.attached",
                dedupe_key=f"attached|{cid}",
                payload={"conversation_url": redact_url(url), "persona": body.persona},
                occurred_at=now(),
            )
        ]
    )
    if body.bot:
        await record.leases.offer(
            cid,
            {"conversation_url": url, "meeting_token": body.meeting_token, "persona": body.persona},
        )
        await record.wake_workers()
    conversation = await _conversation(record, cid)
    return JSONResponse(
        {
            "conversation": conversation.as_dict(),
            "conversation_url": redact_url(url),
            "tavus": None,
            "bot": {"requested": body.bot},
        },
        status_code=201,
    )


# -- interactions and end ----------------------------------------------------------------------


@router.post(
    "/{conversation_id}/interactions",
    dependencies=_auth,
    summary="Send an interaction (echo, respond, interrupt, context, sensitivity, tool result)",
)
async def send_interaction(request: Request, conversation_id: str) -> JSONResponse:
    """Send an interaction to the conversation's replica, through Tavus's API or the bot.

    The body is `{"type": "echo", "text": …}`, `respond`, `interrupt`, `overwrite_context`,
    `append_context`, `sensitivity` or `tool_result`. `?via=rest|bot|auto` overrides
    `CVI_INTERACTIONS_VIA` for this request. Per conversation, interactions leave in the order
    they were accepted. 200: delivered (`via` says how; `message` is the exact message). 202:
    `delivery: "uncertain"`: Tavus answered 504 (or did not answer) and it may have been
    delivered; check before sending it again. 400 invalid body, 404 unknown conversation,
    409 `conversation_ended` (here or at Tavus) or `bot_not_attached`, 413 over the path's
    limit (65,536 bytes REST, 4,096 bot), 429 `tavus_rate_limited`, 502 `tavus_not_delivered`,
    503 `bot_starting` / `bot_unavailable` / `bot_timeout` (with `Retry-After`). Send an
    `Idempotency-Key` header to make a retry safe: a repeated key is answered from the record
    (`replayed: true`) without sending twice.
    """
    record = _record(request)
    raw = await read_json_object(request, record.settings.max_body_bytes)
    conversation = await _conversation(record, conversation_id)
    try:
        interaction = InteractionRequest.parse(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise ApiError(400, message, "invalid_interaction", param) from None
    if conversation.status == "ended":
        raise ApiError(409, "The conversation has ended.", "conversation_ended")
    via = request.query_params.get("via")
    if via is not None and via not in VIAS:
        raise ApiError(400, "via must be auto, rest or bot.", "invalid_via", "via")
    key = (request.headers.get("idempotency-key") or "").strip()[:128]
    request_id = key or uuid.uuid4().hex
    try:
        done = await record.send_interaction(
            conversation_id, interaction, request_id, via=cast(Via | None, via), keyed=bool(key)
        )
    except DeliveryError as exc:
        raise ApiError(exc.status, exc.message, exc.code, headers=exc.headers()) from None
    return JSONResponse(done.as_dict(), status_code=done.status)


@router.post("/{conversation_id}/end", dependencies=_auth, summary="End on Tavus, stop the bot")
async def end_conversation(request: Request, conversation_id: str) -> dict[str, Any]:
    """End the conversation on Tavus, stop its bot and mark it ended here.

    Safe to repeat. `tavus_ended` is false (with a `note`) when Tavus says it already ended
    or does not know it, null without `TAVUS_API_KEY` (then it ends here only);
    `bot_stopped` says whether a bot was attached. Other Tavus failures are passed on
    (the conversation is then left as it was).
    """
    record = _record(request)
    await _conversation(record, conversation_id)
    tavus_ended: bool | None = None
    note = None
    if record.settings.tavus_api_key:
        try:
            await record.tavus.end_conversation(conversation_id)
            tavus_ended = True
        except (TavusBadRequest, TavusNotFound) as exc:
            tavus_ended, note = False, exc.message  # already ended, or not a Tavus conversation
        except TavusError as exc:
            raise tavus_api_error(exc) from None
    else:
        note = "TAVUS_API_KEY is not configured: ended here only"
    bot_stopped = await stop_bot(record, conversation_id, "api_end")
    await record.store.set_conversation_status(
        conversation_id,
        "ended",
        shutdown_reason="end_conversation_endpoint_hit",
        ended_at=now(),
    )
    await record.add_events(
        [
            EventRecord(
                conversation_id=conversation_id,
                source="api",
                kind="conversation.end_requested",
                dedupe_key=f"end|{conversation_id}|{uuid.uuid4().hex[:8]}",
                payload={"tavus_ended": tavus_ended, "bot_stopped": bot_stopped, "note": note},
                occurred_at=now(),
            )
        ]
    )
    conversation = await _conversation(record, conversation_id)
    return {
        "conversation": conversation.as_dict(),
        "tavus_ended": tavus_ended,
        "bot_stopped": bot_stopped,
        "note": note,
    }


# -- live feed ---------------------------------------------------------------------------------


def _ws_key(ws: WebSocket) -> tuple[str | None, str | None]:
    """(key, subprotocol to accept with) from the header, `?key=`, or `bearer.<key>`."""
    offered = [
        p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
    ]
    chosen = WS_PROTOCOL if WS_PROTOCOL in offered else None
    auth = ws.headers.get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), chosen
    if ws.headers.get("x-api-key"):
        return ws.headers["x-api-key"].strip(), chosen
    if ws.query_params.get("key"):
        return ws.query_params["key"].strip(), chosen
    for proto in offered:
        for prefix in _KEY_PROTOCOL_PREFIXES:
            if proto.startswith(prefix):
                # A browser fails the handshake unless one offered protocol is selected.
                return proto[len(prefix) :], chosen or proto
    return None, chosen


@router.websocket("/{conversation_id}/live")
async def live(ws: WebSocket, conversation_id: str) -> None:
    """Every event of the conversation as it is stored: first the backlog (after `?after=`),
    then `{"type": "live"}`, then each new event as `{"type": "event", "event": {…}}`.

    A consumer that cannot keep up is caught up from the store instead of losing events; a
    client that reconnects passes the last event id it saw as `?after=`.
    """
    settings: Settings = ws.app.state.settings
    key, subprotocol = _ws_key(ws)
    if not key or not constant_time_in(key, settings.api_keys):
        await deny_websocket(ws, ApiError(401, "Missing or invalid API key.", "invalid_api_key"))
        return
    after = _ws_after(ws.query_params.get("after"))
    if after is None:
        await deny_websocket(ws, ApiError(400, _AFTER_RANGE, "invalid_after", "after"))
        return
    record = conversations_of(ws.app.state)
    if record is None or await record.store.get_conversation(conversation_id) is None:
        await deny_websocket(
            ws, ApiError(404, f"No conversation {conversation_id!r}.", "conversation_not_found")
        )
        return
    await ws.accept(subprotocol=subprotocol)
    try:
        await _stream(ws, record, conversation_id, after)
    except (WebSocketDisconnect, asyncio.CancelledError):
        pass
    except BusUnavailable as exc:
        log.warning("live feed of %s: %s", conversation_id, exc)
        if ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(1013, "event bus unavailable; reconnect with ?after=<last id>")
    except Exception:
        log.exception("live feed of %s failed", conversation_id)
        if ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")


def _ws_after(value: str | None) -> int | None:
    """`?after=` as an event id (validated here so a bad one is a 400 in the OpenAI shape)."""
    if value is None or value == "":
        return 0
    if len(value) > 20:  # no event id has more digits (and int() refuses past 4300)
        return None
    try:
        after = int(value)
    except ValueError:
        return None
    return after if 0 <= after <= MAX_EVENT_ID else None


async def _stream(
    ws: WebSocket, record: ConversationService, conversation_id: str, after: int
) -> None:
    """Send the feed (`feed.event_feed`, shared with the SSE stream) while watching the client:
    whichever ends first cancels the other, so a closed tab frees its subscription at once."""

    async def send_feed() -> None:
        feed = event_feed(record.store, record.bus, conversation_id, after)
        async with contextlib.aclosing(feed):
            async for item in feed:
                if isinstance(item, Live):
                    await ws.send_json({"type": "live", "backlog": item.backlog})
                else:
                    await ws.send_json({"type": "event", "event": item})

    sender = asyncio.create_task(send_feed())
    closed = asyncio.create_task(_closed(ws))
    try:
        await asyncio.wait({sender, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, closed):
            task.cancel()
        await asyncio.gather(sender, closed, return_exceptions=True)
    if not sender.cancelled():
        sender.result()  # raise what ended the feed: the bus unavailable, a failed send


async def _closed(ws: WebSocket) -> None:
    """Returns when the client goes away (anything it sends is ignored)."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
