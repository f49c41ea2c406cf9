"""Argil (`https://api.argil.ai/v1`): create a video of moments, then render it.

A moment's transcript is at most 250 characters, so a script is split at sentence
boundaries (`split_script`). Our conversation id travels in the video's `extras`. Webhooks are
per account (`/webhooks`), unsigned and without event ids: the URL carries our token, and a
delivery is deduplicated on (`event`, `videoId`). A success is confirmed with
`GET /videos/{id}` before it is trusted (that is the webhook receiver's job).
"""

from __future__ import annotations

import re
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
    as_dict,
    content_key,
    http_error,
    json_or_none,
    list_items,
    parse_time,
    text_or_none,
)

NAME = "argil"
DEFAULT_URL = "https://api.argil.ai/v1"
MOMENT_LIMIT = 250
CONVERSATION_EXTRA = "conversation_id"
VIDEO_EVENTS = ("VIDEO_GENERATION_SUCCESS", "VIDEO_GENERATION_FAILED")

STATUS: dict[str, VideoStatus] = {
    "IDLE": "queued",
    "GENERATING_AUDIO": "rendering",
    "GENERATING_VIDEO": "rendering",
    "DONE": "ready",
    "FAILED": "failed",
    "CONTENT_MODERATED": "failed",
}

# A sentence ends at . ! ? … (or their CJK forms), possibly followed by one closing quote or
# bracket, and then whitespace (only the whitespace is consumed).
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])\s+|(?<=[.!?…。！？][\"'”’)\]])\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def _pack(pieces: list[str], limit: int) -> list[str]:
    """Join consecutive pieces with spaces into chunks of at most `limit` characters."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current} {piece}" if current else piece
        if len(candidate) <= limit:
            current = candidate
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _split_long(sentence: str, limit: int) -> list[str]:
    """A sentence longer than `limit`: cut at clauses, then words, then (last resort) characters."""
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        if len(clause) <= limit:
            pieces.append(clause)
            continue
        for word in clause.split(" "):
            if len(word) <= limit:
                pieces.append(word)
            else:
                pieces.extend(word[i : i + limit] for i in range(0, len(word), limit))
    return _pack([p for p in pieces if p], limit)


def split_script(script: str, limit: int = MOMENT_LIMIT) -> list[str]:
    """Split a script into transcripts of at most `limit` characters, at sentence boundaries.

    Sentences are packed greedily (fewer moments, fewer cuts in the video); a sentence longer
    than the limit is cut at its clauses, then between words. Whitespace is normalized. Every
    piece of text is kept, in order: `" ".join(result)` equals the normalized script (unless a
    single word is longer than the limit and had to be cut).
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    text = " ".join(script.split())
    if not text:
        return []
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= limit:
            pieces.append(sentence)
        else:
            pieces.extend(_split_long(sentence, limit))
    return _pack(pieces, limit)


def video_event(obj: Mapping[str, Any], kind: str = "video.status") -> VideoEvent:
    """An Argil Video object → VideoEvent."""
    video_id = text_or_none(obj.get("id")) or text_or_none(obj.get("videoId"))
    if video_id is None:
        raise ProviderError(NAME, "video object without id")
    raw_status = str(obj.get("status") or "").strip().upper()
    status: VideoStatus = STATUS.get(raw_status, "rendering")
    extras = as_dict(obj.get("extras"))
    return VideoEvent(
        provider=NAME,
        video_id=video_id,
        status=status,
        url=(text_or_none(obj.get("videoUrl")) or text_or_none(obj.get("videoUrlSubtitled")))
        if status == "ready"
        else None,
        error=f"video {raw_status.lower()}" if status == "failed" else None,
        conversation_id=text_or_none(extras.get(CONVERSATION_EXTRA)),
        kind=kind,
        raw=dict(obj),
        occurred_at=parse_time(obj.get("updatedAt")),
    )


def parse_callback(payload: Mapping[str, Any]) -> Delivery:
    """`{"event", "data": {videoId, videoName, videoUrl, extras}}` → Delivery.

    A success is only a claim here (status `ready`); the receiver confirms it with the API.
    """
    name = str(payload.get("event") or "").strip() or "unknown"
    data = as_dict(payload.get("data"))
    extras = as_dict(data.get("extras"))
    conversation_id = text_or_none(extras.get(CONVERSATION_EXTRA))
    video_id = text_or_none(data.get("videoId"))
    if name in VIDEO_EVENTS and video_id:
        ok = name == "VIDEO_GENERATION_SUCCESS"
        event = VideoEvent(
            provider=NAME,
            video_id=video_id,
            status="ready" if ok else "failed",
            url=text_or_none(data.get("videoUrl")) if ok else None,
            error=None if ok else "video generation failed",
            conversation_id=conversation_id,
            kind=name,
            raw=dict(payload),
        )
        return Delivery(NAME, name, f"argil:{name}:{video_id}", event, conversation_id)
    subject = video_id or text_or_none(data.get("avatarId")) or content_key(payload)
    return Delivery(NAME, name, f"argil:{name}:{subject}", None, conversation_id)


class ArgilVideos(ProviderClient):
    name = NAME
    default_url = DEFAULT_URL

    async def _json(self, response: httpx.Response, what: str, video_id: str | None = None) -> Any:
        if response.status_code >= 400:
            raise http_error(
                NAME, response, what, ("message", "error"), numeric_code=True, video_id=video_id
            )
        body = json_or_none(response)
        if body is None:
            raise ProviderError(NAME, f"{what}: response is not JSON", video_id=video_id)
        return body

    def create_body(self, request: CreateVideo) -> dict[str, Any]:
        request.check()
        base: dict[str, Any] = {"avatarId": request.avatar}
        if request.voice:
            base["voiceId"] = request.voice
        moments: list[dict[str, Any]]
        if request.script is not None:
            moments = [{"transcript": t, **base} for t in split_script(request.script)]
        else:
            moments = [{"transcript": "", "audioUrl": request.audio_url, **base}]
        body: dict[str, Any] = {"name": request.title or "Video", "moments": moments}
        if request.conversation_id:
            body["extras"] = {CONVERSATION_EXTRA: request.conversation_id}
        body.update(request.extra)
        return body

    async def create_video(self, request: CreateVideo) -> VideoEvent:
        """Create, then start the render. A failed render raises with `video_id` set."""
        response = await self.http.request("POST", "/videos", json_body=self.create_body(request))
        created = video_event(as_dict(await self._json(response, "create video")))
        render = await self.http.request("POST", f"/videos/{created.video_id}/render")
        body = await self._json(render, "start render", created.video_id)
        event = video_event(as_dict(body) or {"id": created.video_id, "status": "GENERATING_AUDIO"})
        if event.status == "queued":
            # Render accepted: the video is on its way even if the answer still says IDLE.
            event.status = "rendering"
        event.kind = "video.created"
        event.conversation_id = event.conversation_id or request.conversation_id
        return event

    async def get_video(self, video_id: str) -> VideoEvent:
        response = await self.http.request("GET", f"/videos/{video_id}")
        return video_event(as_dict(await self._json(response, f"get video {video_id}")))

    async def list_avatars(self) -> list[Avatar]:
        response = await self.http.request("GET", "/avatars")
        return [
            Avatar(id=str(a["id"]), name=str(a.get("name") or a["id"]), raw=a)
            for a in list_items(await self._json(response, "list avatars"), "avatars", "data")
            if a.get("id")
        ]

    async def list_voices(self) -> list[Voice]:
        response = await self.http.request("GET", "/voices")
        return [
            Voice(id=str(v["id"]), name=str(v.get("name") or v["id"]), raw=v)
            for v in list_items(await self._json(response, "list voices"), "voices", "data")
            if v.get("id")
        ]

    def parse_webhook(self, payload: Mapping[str, Any]) -> Delivery:
        return parse_callback(payload)

    # -- account webhooks ----------------------------------------------------------------------

    async def list_webhooks(self) -> list[dict[str, Any]]:
        response = await self.http.request("GET", "/webhooks")
        return list_items(await self._json(response, "list webhooks"), "webhooks", "data")

    async def register_webhook(
        self, callback_url: str, events: tuple[str, ...] = VIDEO_EVENTS
    ) -> tuple[dict[str, Any], bool]:
        """Create the account webhook, or update the one already pointing at our URL.

        "Our URL" ignores the query string, so rotating the token updates the same webhook.
        Returns (webhook, created).
        """
        ours = callback_url.split("?", 1)[0]
        body = {"callbackUrl": callback_url, "events": list(events)}
        for hook in await self.list_webhooks():
            if str(hook.get("callbackUrl") or "").split("?", 1)[0] == ours and hook.get("id"):
                response = await self.http.request(
                    "PUT", f"/webhooks/{hook['id']}", json_body=body, idempotent=True
                )
                return as_dict(await self._json(response, "update webhook")), False
        response = await self.http.request("POST", "/webhooks", json_body=body)
        return as_dict(await self._json(response, "create webhook")), True
