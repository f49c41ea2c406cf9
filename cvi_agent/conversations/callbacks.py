"""`POST /callbacks/tavus?token=T`: every Tavus webhook, stored exactly once before the 200.

Tavus does not sign callbacks, so the secret is the token in the callback URL we give it
(`CVI_CALLBACK_TOKEN`, a comma list so it can be rotated: the first one goes into new URLs,
all are accepted). Without a configured token the endpoint answers 503 — except in development
mode, where `cvi-agent serve` generates one under var/ like the dev API key.

Ingestion is idempotent: the raw delivery is an `EventRecord` whose dedupe key identifies it
(see `protocol/callbacks.py`), and its effects on the conversation (live, ended, transcript,
recording) are idempotent too and re-applied on a duplicate, so a redelivery heals a delivery
whose effects failed half-way. Unknown kinds are stored, never rejected.

Tavus *video* callbacks (the bare video object, no `event_type`) arrive on this route too; they
are handed to `cvi_agent.videos.webhooks.ingest_tavus_video_callback`, the one place that
records video deliveries (source `video`), advances the `videos` row and announces a ready
video in its conversation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from cvi_agent.bus import commands_channel
from cvi_agent.config import Settings
from cvi_agent.conversations.deps import require_conversations, videos_of
from cvi_agent.conversations.service import ConversationService
from cvi_agent.protocol.callbacks import (
    MAX_ID_LENGTH,
    CallbackError,
    TavusCallback,
    parse_tavus_callback,
    shutdown_code,
)
from cvi_agent.store import EventRecord
from cvi_agent.store.base import now
from cvi_agent.store.errors import describe_error
from cvi_agent.videos import tavus as tavus_videos
from cvi_agent.videos.base import ProviderError
from cvi_agent.videos.service import VideoService
from cvi_agent.videos.webhooks import ingest_tavus_video_callback
from cvi_agent.web.auth import constant_time_in
from cvi_agent.web.body import read_json_object
from cvi_agent.web.errors import ApiError

log = logging.getLogger(__name__)

router = APIRouter(tags=["callbacks"])


@dataclass(slots=True)
class IngestResult:
    """What became of one delivery; the route's answer is made of it.

    Args:
        kind: the callback's kind (`system.shutdown`, …; `video.<status>` for a video).
        conversation_id: the conversation it belongs to ("" when it names none).
        new: True when stored now, False for a duplicate delivery (its effects re-applied).
        event_id: the stored event's id (None for a video delivery or a duplicate).
    """

    kind: str
    conversation_id: str
    new: bool | None  # None: not reported (video deliveries)
    event_id: int | None


def check_callback_token(settings: Settings, token: str | None) -> None:
    """Refuse a delivery before its body is read: 503 when no token is configured (we never
    accept unauthenticated callbacks), 401 for a missing or unknown token (constant time)."""
    tokens = settings.callback_tokens
    if not tokens:
        raise ApiError(
            503,
            "Tavus callbacks are disabled: set CVI_CALLBACK_TOKEN (a secret; a comma list to "
            "rotate) and give Tavus the callback URL "
            "<CVI_PUBLIC_URL>/callbacks/tavus?token=<token>.",
            "callback_token_not_configured",
        )
    if not token:
        raise ApiError(
            401, "Missing callback token: expected ?token=… in the URL.", "missing_callback_token"
        )
    if not constant_time_in(token, tokens):
        raise ApiError(401, "Invalid callback token.", "invalid_callback_token")


def callback_url(settings: Settings) -> str:
    """The URL we give Tavus as `callback_url` (the first configured token)."""
    if not settings.callback_tokens:
        raise ApiError(
            503,
            "Cannot create a conversation whose callbacks we would refuse: set CVI_CALLBACK_TOKEN.",
            "callback_token_not_configured",
        )
    return settings.public_url.rstrip("/") + "/callbacks/tavus?token=" + settings.callback_tokens[0]


@router.post(
    "/callbacks/tavus",
    summary="Tavus webhooks (conversation, video and replica callbacks)",
    responses={
        s: {"description": d}
        for s, d in ((400, "bad JSON"), (401, "bad token"), (413, "too large"), (503, "not ready"))
    },
)
async def tavus_callback(request: Request, token: str | None = None) -> JSONResponse:
    """Every Tavus webhook: conversation callbacks (any `event_type`, known or not), video
    callbacks and replica callbacks. Give Tavus `<public URL>/callbacks/tavus?token=<token>`.

    The delivery is committed before the 200, so a 200 is never lost; a redelivery is stored
    once (`"status": "duplicate"`) and its effects re-applied; order does not matter (a late
    `replica_joined` never revives an ended conversation). 400 for unusable JSON, 401 for a
    missing or wrong token, 413 above `CVI_CALLBACK_MAX_BYTES`, 503 when no callback token is
    configured, and 503 with `Retry-After` while the database is unavailable (retry: the
    delivery will be stored once).
    """
    settings: Settings = request.app.state.settings
    check_callback_token(settings, token)
    raw = await read_json_object(request, settings.callback_max_bytes)
    record = require_conversations(request.app.state)
    videos = videos_of(request.app.state)
    try:
        result = await ingest_tavus_callback(record, raw, videos)
    except CallbackError as exc:
        raise ApiError(400, f"Unusable callback: {exc}.", "invalid_callback") from None
    except (SQLAlchemyError, OSError) as exc:
        # Expected while the database restarts: one line, no traceback; Tavus gets a 503.
        log.warning("could not store a Tavus callback (answered 503): %s", describe_error(exc))
        raise ApiError(
            503,
            "The callback could not be stored right now; retry.",
            "storage_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    status = {True: "stored", False: "duplicate", None: "accepted"}[result.new]
    log.info(
        "tavus callback %s conversation=%s %s", result.kind, result.conversation_id or "-", status
    )
    return JSONResponse(
        {
            "status": status,
            "kind": result.kind,
            "conversation_id": result.conversation_id or None,
            "event_id": result.event_id,
        }
    )


async def ingest_tavus_callback(
    record: ConversationService, raw: dict[str, Any], videos: VideoService | None = None
) -> IngestResult:
    """Store one Tavus webhook (any kind) and apply its effects. Raises `CallbackError`."""
    if tavus_videos.is_video_callback(raw):
        video_id = raw.get("video_id")
        if not isinstance(video_id, str | int) or len(str(video_id)) > MAX_ID_LENGTH:
            raise CallbackError(f"video_id must be a string of at most {MAX_ID_LENGTH} characters")
        try:
            tavus_videos.parse_callback(raw)  # a blank video_id is refused here, not with a 500
        except ProviderError as exc:
            raise CallbackError(str(exc)) from None
        video = await ingest_tavus_video_callback(record.store, raw, service=videos)
        return IngestResult(f"video.{video.status}", video.conversation_id or "", None, None)
    cb = parse_tavus_callback(raw)
    event = _event(cb)
    effects = cb.category == "conversation" and bool(cb.conversation_id)

    async def store(conn: AsyncConnection) -> list[EventRecord]:
        # The delivery and its effects in one transaction: one turn of the SQLite write lock,
        # one commit (under load a callback queued for the lock three or four times).
        stored = await record.store.add_events([event], conn=conn)
        if effects:
            await _apply(record, cb, conn)
        return stored

    stored: list[EventRecord] = await record.store.transaction(store)
    await record.publish_many(stored)
    if effects and cb.kind == "system.shutdown":
        await tell_bot_to_stop(record, cb.conversation_id, "shutdown")
    return IngestResult(cb.kind, cb.conversation_id, bool(stored), event.id)


def _event(cb: TavusCallback) -> EventRecord:
    return EventRecord(
        conversation_id=cb.conversation_id,
        source="callback",
        kind=cb.kind,
        dedupe_key=cb.dedupe_key,
        payload=cb.payload,
        occurred_at=cb.occurred_at,
    )


async def _apply(record: ConversationService, cb: TavusCallback, conn: AsyncConnection) -> None:
    """The callback's effect on the conversation, in the delivery's transaction; idempotent,
    order-independent. (A shutdown's bus message to the bot goes out after the commit.)"""
    store = record.store
    cid = cb.conversation_id
    props = cb.properties
    if cb.kind == "system.shutdown":
        reason = props.get("shutdown_reason")
        await store.set_conversation_status(
            cid,
            "ended",
            shutdown_reason=shutdown_code(reason),
            ended_at=cb.occurred_at or now(),
            meta={"shutdown_detail": str(reason) if reason is not None else None},
            conn=conn,
        )
        await record.leases.finish(cid, conn=conn)
    elif cb.kind == "system.replica_joined":
        await store.set_conversation_status(
            cid, "live", unless=("ended",), meta={"replica_id": props.get("replica_id")}, conn=conn
        )
    elif cb.kind == "application.transcription_ready":
        transcript = props.get("transcript")
        if isinstance(transcript, list):
            entries = [t for t in transcript if isinstance(t, dict)]
            await store.set_transcript(cid, entries, conn=conn)
        await store.upsert_conversation(cid, conn=conn)
    elif cb.kind == "application.recording_ready":
        await store.upsert_conversation(cid, meta={"recording": props}, conn=conn)
    elif cb.kind in ("application.perception_analysis", "application.perception-analysis"):
        analysis = props.get("analysis")
        await store.upsert_conversation(cid, meta={"perception_analysis": analysis}, conn=conn)
    else:
        await store.upsert_conversation(cid, conn=conn)


async def stop_bot(record: ConversationService, conversation_id: str, reason: str) -> bool:
    """No bot is wanted any more: drop the lease (the owning worker notices at its next
    heartbeat) and tell the bot at once over the bus. Returns whether a lease existed."""
    existed = await record.leases.finish(conversation_id)
    await tell_bot_to_stop(record, conversation_id, reason)
    return existed


async def tell_bot_to_stop(record: ConversationService, conversation_id: str, reason: str) -> None:
    """Best effort: the bot's worker also notices the missing lease at its next heartbeat."""
    try:
        await record.bus.publish(
            commands_channel(conversation_id), {"op": "stop", "reason": reason}
        )
    except Exception as exc:
        log.warning(
            "could not tell the bot of %s to stop (%s); its worker will", conversation_id, exc
        )
