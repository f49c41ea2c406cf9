"""JoggAI (`https://api.jogg.ai/v2`): every answer is an envelope `{code, msg, data}`.

`code` 0 is success; anything else is an error even under HTTP 200, so both the HTTP status and
the code are checked (`JOGG_CODES` names them). The key allows 20 POST requests per minute: the
client waits for a slot (`RequestPacer`) instead of being refused. Webhooks are signed:
`X-Webhook-Signature` = lowercase hex HMAC-SHA256(endpoint secret, raw body); deliveries are
deduplicated on `event_id`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from cvi_agent.videos.base import (
    Avatar,
    CreateVideo,
    Delivery,
    ProviderClient,
    ProviderError,
    RequestPacer,
    VideoEvent,
    VideoStatus,
    Voice,
    as_dict,
    content_key,
    default_should_retry,
    json_or_none,
    list_items,
    parse_time,
    text_or_none,
)

NAME = "jogg"
DEFAULT_URL = "https://api.jogg.ai/v2"
POSTS_PER_MINUTE = 20
VIDEO_EVENTS = ("generated_avatar_video_success", "generated_avatar_video_failed")
SIGNATURE_HEADER = "x-webhook-signature"

JOGG_CODES: dict[int, str] = {
    0: "success",
    429: "rate limited",
    10104: "not found",
    10105: "invalid API key",
    18020: "no credit left",
    18025: "no API permission",
    40000: "parameter error",
    50000: "system error",
}

STATUS: dict[str, VideoStatus] = {
    "pending": "queued",
    "processing": "rendering",
    "completed": "ready",
    "failed": "failed",
}


class JoggError(ProviderError):
    """A non-zero `code` (or an HTTP error) from JoggAI; `meaning` names the code."""

    @property
    def meaning(self) -> str:
        return JOGG_CODES.get(self.code, "unknown error") if isinstance(self.code, int) else ""


def _code(body: Any) -> int | None:
    if not isinstance(body, dict) or "code" not in body:
        return None
    try:
        return int(body["code"])
    except (TypeError, ValueError):
        return -1


def should_retry(response: httpx.Response, idempotent: bool) -> bool:
    """HTTP 429/5xx as usual, and the same meanings carried in the envelope under HTTP 200."""
    if default_should_retry(response, idempotent):
        return True
    if response.status_code >= 400:
        return False
    code = _code(json_or_none(response))
    return code == 429 or (code == 50000 and idempotent)


def unwrap(response: httpx.Response, what: str) -> Any:
    """`data` of a successful envelope; JoggError for an HTTP error or a non-zero code."""
    body = json_or_none(response)
    code = _code(body)
    message = text_or_none(body.get("msg")) if isinstance(body, dict) else None
    if response.status_code >= 400 or code is None or code != 0:
        if code is None and response.status_code < 400:
            raise JoggError(NAME, f"{what}: response is not a JoggAI envelope")
        meaning = JOGG_CODES.get(code, "unknown error") if code is not None else None
        text = meaning or response.reason_phrase or "error"
        if message and message.lower() != text.lower():
            text = f"{text}: {message}"
        raise JoggError(
            NAME,
            f"{what}: {text}",
            status=response.status_code,
            code=code,
            retryable=code in (429, 50000) or response.status_code >= 500,
        )
    return body.get("data") if isinstance(body, dict) else None


def signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, presented: str | None, secrets: Iterable[str]) -> bool:
    """Whether `presented` is the HMAC of the raw body under one of `secrets` (constant time).

    Tolerates a `sha256=` prefix and upper-case hex; every secret is compared.
    """
    if not presented:
        return False
    given = presented.strip().lower()
    if given.startswith("sha256="):
        given = given[len("sha256=") :]
    ok = False
    for secret in secrets:
        if secret:
            ok |= hmac.compare_digest(given.encode(), signature(secret, body).encode())
    return ok


def video_event(data: Mapping[str, Any], kind: str = "video.status") -> VideoEvent:
    """`data` of `GET /avatar_video/{id}` or of a webhook → VideoEvent (`project_id` accepted)."""
    video_id = text_or_none(data.get("video_id")) or text_or_none(data.get("project_id"))
    if video_id is None:
        raise JoggError(NAME, "video without video_id")
    raw_status = str(data.get("status") or "").strip().lower()
    status: VideoStatus = STATUS.get(raw_status, "rendering")
    error = None
    if status == "failed":
        err = as_dict(data.get("error"))
        code = err.get("code")
        error = text_or_none(err.get("message")) or "video generation failed"
        if code is not None:
            error = f"{error} (code {code})"
    return VideoEvent(
        provider=NAME,
        video_id=video_id,
        status=status,
        url=text_or_none(data.get("video_url")) if status == "ready" else None,
        error=error,
        kind=kind,
        raw=dict(data),
        occurred_at=parse_time(data.get("created_at")),
    )


def parse_callback(payload: Mapping[str, Any]) -> Delivery:
    name = str(payload.get("event") or "").strip() or "unknown"
    event_id = text_or_none(payload.get("event_id"))
    key = f"jogg:{event_id}" if event_id else f"jogg:sha256:{content_key(payload)}"
    data = as_dict(payload.get("data"))
    has_id = bool(data.get("video_id") or data.get("project_id"))
    if name in VIDEO_EVENTS and has_id:
        if not data.get("status"):
            data["status"] = "completed" if name.endswith("success") else "failed"
        event = video_event(data, kind=name)
        # The event name wins over a missing or odd status in the data.
        event.status = "ready" if name.endswith("success") else "failed"
        if event.status == "failed" and not event.error:
            event.error = "video generation failed"
        event.raw = dict(payload)
        event.occurred_at = parse_time(payload.get("timestamp"))
        return Delivery(NAME, name, key, event)
    return Delivery(NAME, name, key, None)


class JoggVideos(ProviderClient):
    name = NAME
    default_url = DEFAULT_URL

    def default_limiter(self) -> RequestPacer:
        return RequestPacer(POSTS_PER_MINUTE, 60.0)

    retry_decision = staticmethod(should_retry)

    def create_body(self, request: CreateVideo) -> dict[str, Any]:
        request.check()
        extra = dict(request.extra)
        try:
            avatar_id = int(request.avatar)
        except ValueError:
            raise JoggError(
                NAME, f"avatar ids are integers, got {request.avatar!r}", code=40000
            ) from None
        avatar = {"avatar_id": avatar_id, "avatar_type": int(extra.pop("avatar_type", 0))}
        voice: dict[str, Any]
        if request.script is not None:
            if not request.voice:
                raise JoggError(NAME, "a voice is required to speak a script", code=40000)
            voice = {"type": "script", "voice_id": request.voice, "script": request.script}
        else:
            voice = {"type": "audio", "audio_url": request.audio_url}
            if request.voice:
                voice["voice_id"] = request.voice
        body: dict[str, Any] = {
            "avatar": avatar,
            "voice": voice,
            "aspect_ratio": "portrait",
            "screen_style": 1,
            "caption": False,
        }
        if request.title:
            body["video_name"] = request.title
        if request.callback_url:
            body["webhook_url"] = request.callback_url
        body.update(extra)
        return body

    async def create_video(self, request: CreateVideo) -> VideoEvent:
        response = await self.http.request(
            "POST", "/create_video_from_avatar", json_body=self.create_body(request)
        )
        data = as_dict(unwrap(response, "create video"))
        video_id = text_or_none(data.get("video_id")) or text_or_none(data.get("project_id"))
        if video_id is None:
            raise JoggError(NAME, "create video: no video_id in the answer")
        return VideoEvent(
            provider=NAME,
            video_id=video_id,
            status="queued",
            conversation_id=request.conversation_id,
            kind="video.created",
            raw=data,
        )

    async def get_video(self, video_id: str) -> VideoEvent:
        response = await self.http.request("GET", f"/avatar_video/{video_id}")
        data = as_dict(unwrap(response, f"get video {video_id}"))
        data.setdefault("video_id", video_id)
        return video_event(data)

    async def list_avatars(self) -> list[Avatar]:
        response = await self.http.request(
            "GET", "/avatars/public", params={"page": 1, "page_size": 100}
        )
        return [
            Avatar(id=str(a.get("id", a.get("avatar_id"))), name=str(a.get("name") or ""), raw=a)
            for a in list_items(unwrap(response, "list avatars"), "avatars", "list")
            if a.get("id") is not None or a.get("avatar_id") is not None
        ]

    async def list_voices(self) -> list[Voice]:
        response = await self.http.request("GET", "/voices")
        return [
            Voice(id=str(v.get("voice_id", v.get("id"))), name=str(v.get("name") or ""), raw=v)
            for v in list_items(unwrap(response, "list voices"), "voices", "list")
            if v.get("voice_id") is not None or v.get("id") is not None
        ]

    def parse_webhook(self, payload: Mapping[str, Any]) -> Delivery:
        return parse_callback(payload)

    # -- account webhook endpoints -------------------------------------------------------------

    async def list_endpoints(self) -> list[dict[str, Any]]:
        response = await self.http.request("GET", "/endpoints")
        return list_items(unwrap(response, "list webhook endpoints"), "endpoints", "list", "items")

    async def register_webhook(
        self, url: str, events: tuple[str, ...] = VIDEO_EVENTS, *, have_secret: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """Create the endpoint, or update the one already at our URL. Returns (endpoint, created).

        The signing secret comes back on creation (`endpoint["secret"]`). When an endpoint for
        our URL exists but we hold no secret for it, it is replaced so that we get one.
        """
        body = {"url": url, "status": "enabled", "events": list(events)}
        ours = url.split("?", 1)[0]
        for endpoint in await self.list_endpoints():
            endpoint_id = endpoint.get("endpoint_id") or endpoint.get("id")
            if str(endpoint.get("url") or "").split("?", 1)[0] != ours or endpoint_id is None:
                continue
            if have_secret:
                response = await self.http.request(
                    "PUT", f"/endpoint/{endpoint_id}", json_body=body, idempotent=True
                )
                updated = as_dict(unwrap(response, "update webhook endpoint"))
                return {**endpoint, **updated}, False
            response = await self.http.request("DELETE", f"/endpoint/{endpoint_id}")
            unwrap(response, "delete webhook endpoint")
        response = await self.http.request("POST", "/endpoint", json_body=body)
        return as_dict(unwrap(response, "create webhook endpoint")), True
