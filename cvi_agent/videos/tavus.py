"""Tavus video generation (`POST /v2/videos`): a replica speaks a script or an audio file.

Tavus calls the `callback_url` given at creation with the whole video object (no event-type
field, unsigned): our URL carries a secret token, and deliveries are deduplicated on
(`video_id`, `status`). Replicas are the avatars; a replica has its own voice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from cvi_agent.videos.base import (
    Avatar,
    CreateVideo,
    Delivery,
    ProviderClient,
    ProviderError,
    VideoEvent,
    VideoStatus,
    Voice,
    http_error,
    json_or_none,
    parse_time,
    text_or_none,
)

NAME = "tavus"
DEFAULT_URL = "https://tavusapi.com"

STATUS: dict[str, VideoStatus] = {
    "queued": "queued",
    "generating": "rendering",
    "ready": "ready",
    "error": "failed",
    "deleted": "failed",
}


def is_video_callback(payload: Mapping[str, Any]) -> bool:
    """Whether a payload POSTed to the Tavus callback URL is a video callback.

    Conversation callbacks have an `event_type`; video callbacks are the bare video object.
    """
    return bool(payload.get("video_id")) and not payload.get("event_type")


def video_event(obj: Mapping[str, Any], kind: str | None = None) -> VideoEvent:
    """A Tavus video object (create response, GET, or callback) → VideoEvent."""
    video_id = text_or_none(obj.get("video_id"))
    if video_id is None:
        raise ProviderError(NAME, "video object without video_id")
    raw_status = str(obj.get("status") or "").strip().lower()
    status: VideoStatus = STATUS.get(raw_status, "rendering")
    error = None
    if status == "failed":
        error = (
            text_or_none(obj.get("status_details"))
            or text_or_none(obj.get("error"))
            or f"video {raw_status}"
        )
    url = None
    if status == "ready":
        url = (
            text_or_none(obj.get("download_url"))
            or text_or_none(obj.get("hosted_url"))
            or text_or_none(obj.get("stream_url"))
        )
    return VideoEvent(
        provider=NAME,
        video_id=video_id,
        status=status,
        url=url,
        error=error,
        kind=kind or f"video.{raw_status or 'unknown'}",
        raw=dict(obj),
        occurred_at=parse_time(obj.get("updated_at")) or parse_time(obj.get("created_at")),
    )


def parse_callback(payload: Mapping[str, Any]) -> Delivery:
    event = video_event(payload)
    raw_status = str(payload.get("status") or "").strip().lower()
    return Delivery(
        provider=NAME,
        kind=event.kind,
        dedupe_key=f"tavus:{event.video_id}:{raw_status}",
        event=event,
    )


class TavusVideos(ProviderClient):
    name = NAME
    default_url = DEFAULT_URL

    async def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 400:
            raise http_error(NAME, response, what, ("error", "message"))
        body = json_or_none(response)
        if not isinstance(body, dict):
            raise ProviderError(NAME, f"{what}: response is not a JSON object")
        return body

    async def create_video(self, request: CreateVideo) -> VideoEvent:
        request.check()
        body: dict[str, Any] = {"replica_id": request.avatar}
        if request.script is not None:
            body["script"] = request.script
        else:
            body["audio_url"] = request.audio_url
        if request.title:
            body["video_name"] = request.title
        if request.callback_url:
            body["callback_url"] = request.callback_url
        body.update(request.extra)
        response = await self.http.request("POST", "/v2/videos", json_body=body)
        event = video_event(await self._json(response, "create video"), kind="video.created")
        event.conversation_id = request.conversation_id
        return event

    async def get_video(self, video_id: str) -> VideoEvent:
        response = await self.http.request("GET", f"/v2/videos/{video_id}")
        return video_event(await self._json(response, f"get video {video_id}"))

    async def list_avatars(self) -> list[Avatar]:
        """Replicas (`GET /v2/replicas`): each replica is an avatar with its own voice."""
        response = await self.http.request("GET", "/v2/replicas", params={"limit": 100})
        body = await self._json(response, "list replicas")
        items = body.get("data") or []
        return [
            Avatar(
                id=str(item.get("replica_id")),
                name=str(item.get("replica_name") or item.get("replica_id")),
                raw=dict(item),
            )
            for item in items
            if isinstance(item, dict) and item.get("replica_id")
        ]

    async def list_voices(self) -> list[Voice]:
        """Tavus replicas speak with their own voice: there is nothing to choose."""
        return []

    def parse_webhook(self, payload: Mapping[str, Any]) -> Delivery:
        return parse_callback(payload)
