"""Webhook receivers for the avatar-video providers.

- `POST /callbacks/argil?token=T` (or `/callbacks/argil/T`): unsigned; the token in the URL is
  `CVI_CALLBACK_TOKEN`, compared in constant time. A success is confirmed with
  `GET /videos/{id}` before it is trusted; if that fails the video is stored as `rendering`
  and the poller finishes it.
- `POST /callbacks/jogg`: `X-Webhook-Signature` = lowercase hex HMAC-SHA256 of the raw body
  under the endpoint secret (`JOGG_WEBHOOK_SECRET` or `var/jogg-webhook-secret`). Per-request
  `webhook_url` deliveries carry `?token=T` instead.
- Tavus video callbacks arrive on the Tavus callback route (`POST /callbacks/tavus`, built in
  `cvi_agent/conversations/callbacks.py`), which hands video payloads to `ingest_tavus_video_callback`.

Every delivery is stored (an `events` row, source `video`) before the 200, deduplicated per
provider (Tavus (video_id, status), Argil (event, videoId), JoggAI event_id); unknown events are
kept raw and acknowledged. A bad token or signature is a 401 and nothing is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request

from cvi_agent.store import SqlStore
from cvi_agent.videos import argil, jogg, tavus
from cvi_agent.videos.announce import announce_video_ready
from cvi_agent.videos.base import Delivery, ProviderError, VideoEvent
from cvi_agent.videos.service import VideoService, apply_video_event, event_row
from cvi_agent.web.auth import constant_time_in
from cvi_agent.web.body import parse_json_object, read_body
from cvi_agent.web.errors import ApiError

log = logging.getLogger(__name__)

ARGIL_CONFIRM_TIMEOUT = 3.0

router = APIRouter(tags=["callbacks"])


class NotAVideoCallback(ValueError):
    """The payload is not a Tavus video callback (no `video_id`, or it has an `event_type`)."""


async def store_delivery(store: SqlStore, delivery: Delivery, payload: Mapping[str, Any]) -> bool:
    """Keep the delivery as received (one row per dedupe key). Returns whether it was new."""
    if delivery.event is not None:
        event = delivery.event
        prior = await store.get_video(event.provider, event.video_id)
        event.conversation_id = event.conversation_id or (prior.conversation_id if prior else None)
        row = event_row(event, delivery.dedupe_key, event.conversation_id)
        row.payload["raw"] = dict(payload)
    else:
        row = event_row(
            VideoEvent(delivery.provider, "", "queued", kind=delivery.kind),
            delivery.dedupe_key,
            delivery.conversation_id,
        )
        row.payload = {
            "provider": delivery.provider,
            "kind": delivery.kind,
            "conversation_id": delivery.conversation_id,
            "raw": dict(payload),
        }
    return bool(await store.add_events([row]))


async def ingest_tavus_video_callback(
    store: SqlStore, payload: Mapping[str, Any], *, service: VideoService | None = None
) -> VideoEvent:
    """Store a Tavus video callback (`{video_id, status, download_url, …}`) and apply it.

    For the Tavus callback route: call it when `tavus.is_video_callback(payload)`, after the
    token check, before answering 200. Raises NotAVideoCallback for other payloads. Pass the
    process's VideoService (`app.state.videos`) so announcements reach its publisher.
    """
    if not tavus.is_video_callback(payload):
        raise NotAVideoCallback("not a Tavus video callback")
    delivery = tavus.parse_callback(payload)
    assert delivery.event is not None
    await store_delivery(store, delivery, payload)
    announce = service.announce if service is not None else None
    prior = await store.get_video("tavus", delivery.event.video_id)
    video, _ = await apply_video_event(
        store,
        delivery.event,
        prior=prior,
        announce=announce or (lambda v: announce_video_ready(store, v)),
    )
    delivery.event.conversation_id = video.conversation_id
    return delivery.event


async def confirm_argil_success(service: VideoService, claim: VideoEvent) -> VideoEvent:
    """What the API says about a video a webhook claims is done.

    Argil's webhooks are unsigned, so a claim is only trusted once `GET /videos/{id}` agrees.
    When the API cannot be asked, the video is `rendering`: the poller asks again later.
    """
    try:
        async with asyncio.timeout(ARGIL_CONFIRM_TIMEOUT):
            confirmed = await service.provider("argil").get_video(claim.video_id)
    except (ProviderError, TimeoutError) as exc:
        log.warning(
            "argil video %s: could not confirm success (%s); left to the poller",
            claim.video_id,
            exc,
        )
        return VideoEvent(
            "argil",
            claim.video_id,
            "rendering",
            conversation_id=claim.conversation_id,
            kind=claim.kind,
            raw=claim.raw,
        )
    confirmed.kind = claim.kind
    confirmed.conversation_id = confirmed.conversation_id or claim.conversation_id
    if confirmed.status == "ready":
        confirmed.url = confirmed.url or claim.url
    return confirmed


async def ingest_argil_callback(service: VideoService, payload: Mapping[str, Any]) -> Delivery:
    delivery = argil.parse_callback(payload)
    new = await store_delivery(service.store, delivery, payload)
    event = delivery.event
    if event is None:
        log.info("argil: kept %s delivery (%s)", delivery.kind, "new" if new else "duplicate")
        return delivery
    prior = await service.store.get_video("argil", event.video_id)
    if event.status == "ready":
        if prior is not None and prior.status == "ready":
            return delivery  # confirmed before: a redelivery adds nothing
        event = await confirm_argil_success(service, event)
    await apply_video_event(service.store, event, prior=prior, announce=service.announce)
    return delivery


async def ingest_jogg_callback(service: VideoService, payload: Mapping[str, Any]) -> Delivery:
    delivery = jogg.parse_callback(payload)
    await store_delivery(service.store, delivery, payload)
    if delivery.event is not None:
        prior = await service.store.get_video("jogg", delivery.event.video_id)
        await apply_video_event(
            service.store, delivery.event, prior=prior, announce=service.announce
        )
    return delivery


def video_service(request: Request) -> VideoService:
    """The process's video service (`app.state.videos`), or a 503 while it is not running."""
    service: VideoService | None = getattr(request.app.state, "videos", None)
    if service is None:
        raise ApiError(503, "The video service is not running.", "videos_unavailable")
    return service


def _check_token(service: VideoService, token: str | None, provider: str) -> None:
    accepted = service.settings.callback_tokens  # a comma list: every one is accepted
    if not accepted:
        raise ApiError(
            503,
            f"{provider} callbacks with a URL token are disabled: set CVI_CALLBACK_TOKEN.",
            "callbacks_not_configured",
        )
    if not token or not constant_time_in(token, accepted):
        raise ApiError(401, "Invalid or missing callback token.", "invalid_callback_token")


def _ack(delivery: Delivery) -> dict[str, Any]:
    return {
        "received": True,
        "kind": delivery.kind,
        "video_id": delivery.event.video_id if delivery.event else None,
    }


@router.post("/callbacks/argil", summary="Argil webhook (token in the URL)")
async def argil_callback(request: Request, token: str | None = None) -> dict[str, Any]:
    service = video_service(request)
    _check_token(service, token, "Argil")
    payload = parse_json_object(await read_body(request, service.settings.max_body_bytes))
    return _ack(await ingest_argil_callback(service, payload))


@router.post("/callbacks/argil/{path_token}", include_in_schema=False)
async def argil_callback_path(request: Request, path_token: str) -> dict[str, Any]:
    service = video_service(request)
    _check_token(service, path_token, "Argil")
    payload = parse_json_object(await read_body(request, service.settings.max_body_bytes))
    return _ack(await ingest_argil_callback(service, payload))


@router.post("/callbacks/jogg", summary="JoggAI webhook (HMAC-signed, or token in the URL)")
async def jogg_callback(request: Request, token: str | None = None) -> dict[str, Any]:
    service = video_service(request)
    body = await read_body(request, service.settings.max_body_bytes)
    if token is not None:
        _check_token(service, token, "JoggAI")
    else:
        secrets = service.jogg_secrets()
        if not secrets:
            raise ApiError(
                503,
                "JoggAI webhooks are not configured: run `cvi-agent videos webhooks register "
                "--provider jogg` or set JOGG_WEBHOOK_SECRET.",
                "callbacks_not_configured",
            )
        if not jogg.verify_signature(body, request.headers.get(jogg.SIGNATURE_HEADER), secrets):
            raise ApiError(401, "Invalid or missing X-Webhook-Signature.", "invalid_signature")
    payload = parse_json_object(body)
    return _ack(await ingest_jogg_callback(service, payload))
