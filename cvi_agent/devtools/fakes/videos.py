"""Fake Tavus, Argil and JoggAI video APIs on one loopback server: for tests, demos and the CLI.

Each speaks its provider's documented shapes (VIDEO_PROVIDERS.md): Tavus under `/tavus`
(`/v2/videos`), Argil under `/argil/v1`, JoggAI under `/jogg/v2` with its `{code, msg, data}`
envelope and error codes (under HTTP 200, as the worst case). Videos advance through the
provider's statuses in time (`stage_seconds` per status; Argil only once rendered:
IDLE → GENERATING_AUDIO → GENERATING_VIDEO → DONE); a script containing "FAIL" ends failed.
When a video finishes, the fake delivers the provider's webhook: Tavus to the video's
`callback_url`, Argil to its registered account webhooks, JoggAI to the per-request
`webhook_url` and (HMAC-signed) to its registered endpoints.

Tests inject faults (`fail_next`) and read what happened (`creates`, `requests`, `served`,
`deliveries`). `cvi-agent videos fake-server` serves it; `env(url)` says how to point clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

DEFAULT_KEY = "fake-video-key"

STAGES = {
    "tavus": ["queued", "generating", "ready"],
    "argil": ["GENERATING_AUDIO", "GENERATING_VIDEO", "DONE"],
    "jogg": ["pending", "processing", "completed"],
}
FAILED = {"tavus": "error", "argil": "FAILED", "jogg": "failed"}


@dataclass
class Fault:
    provider: str
    method: str
    path: str  # a substring of the path below the provider prefix
    status: int | None = 429  # None: answer normally (after `delay`)
    times: int = 1
    body: dict[str, Any] | None = None
    jogg_code: int | None = None  # JoggAI: answer this envelope code (with `status`)
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class FakeVideo:
    provider: str
    id: str
    body: dict[str, Any]
    name: str
    script: str
    created: float
    started: float | None  # when rendering started (Argil: at /render)
    callback_url: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False
    delivered: bool = False
    pinned: str | None = None  # a status that never changes (seeded videos)

    @property
    def fails(self) -> bool:
        return "FAIL" in self.script


def env(url: str, key: str = DEFAULT_KEY) -> dict[str, str]:
    """Environment variables that point the cvi-agent video clients at a fake on `url`."""
    return {
        "TAVUS_API_URL": f"{url}/tavus",
        "TAVUS_API_KEY": key,
        "ARGIL_API_URL": f"{url}/argil/v1",
        "ARGIL_API_KEY": key,
        "JOGG_API_URL": f"{url}/jogg/v2",
        "JOGG_API_KEY": key,
    }


class FakeVideoProviders:
    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        *,
        stage_seconds: float = 0.05,
        deliver_webhooks: bool = True,
        jogg_posts_per_minute: int | None = None,
        public_url: str = "https://storage.example.test",
    ) -> None:
        self.api_key = api_key
        self.stage_seconds = stage_seconds
        self.deliver_webhooks = deliver_webhooks
        self.jogg_posts_per_minute = jogg_posts_per_minute
        self.public_url = public_url
        self.videos: dict[tuple[str, str], FakeVideo] = {}
        self.faults: list[Fault] = []
        self.creates: dict[str, list[dict[str, Any]]] = {p: [] for p in STAGES}
        self.requests: list[tuple[str, str, str, float]] = []  # provider, method, path, time
        self.served: dict[tuple[str, str], list[str]] = {}  # statuses answered per video
        self.deliveries: list[dict[str, Any]] = []
        self.argil_webhooks: dict[str, dict[str, Any]] = {}
        self.jogg_endpoints: dict[str, dict[str, Any]] = {}
        self.app = self._build()

    # -- test controls ------------------------------------------------------------------------

    def fail_next(
        self,
        provider: str,
        method: str,
        path: str,
        status: int | None = 429,
        times: int = 1,
        body: dict[str, Any] | None = None,
        jogg_code: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next `times` matching requests get `status` (None: a normal answer after `delay`)."""
        self.faults.append(
            Fault(provider, method.upper(), path, status, times, body, jogg_code, delay)
        )

    def seed(
        self,
        provider: str,
        video_id: str,
        *,
        done: bool = True,
        status: str | None = None,
        script: str = "seeded",
        extras: dict[str, Any] | None = None,
    ) -> FakeVideo:
        """A video that exists on the provider already (e.g. the one a fixture webhook names).

        `done`: finished now; otherwise it starts rendering now. `status` pins the provider's
        status (e.g. "GENERATING_VIDEO") until the test sets `video.pinned = None`. No
        webhook is delivered for a seeded video.
        """
        started = time.monotonic() - (100 * self.stage_seconds if done else 0.0)
        video = FakeVideo(
            provider, video_id, {}, "seeded", script, started, started, extras=extras or {}
        )
        video.pinned = status
        video.delivered = True
        self.videos[(provider, video_id)] = video
        return video

    def count(self, provider: str, method: str, path: str = "") -> int:
        return sum(
            1 for p, m, q, _ in self.requests if p == provider and m == method.upper() and path in q
        )

    def status_of(self, video: FakeVideo) -> str:
        if video.pinned is not None:
            return video.pinned
        if video.started is None:
            return "IDLE" if video.provider == "argil" else STAGES[video.provider][0]
        stages = STAGES[video.provider]
        index = int((time.monotonic() - video.started) / self.stage_seconds)
        if index >= len(stages) - 1:
            return FAILED[video.provider] if video.fails else stages[-1]
        return stages[index]

    def _done(self, video: FakeVideo) -> bool:
        return self.status_of(video) in (STAGES[video.provider][-1], FAILED[video.provider])

    def _url(self, video: FakeVideo) -> str:
        return f"{self.public_url}/{video.provider}/{video.id}.mp4"

    # -- plumbing -------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def _fault(self, provider: str, request: Request, sub_path: str) -> Response | None:
        for fault in self.faults:
            if (
                fault.times > 0
                and fault.provider == provider
                and fault.method == request.method
                and fault.path in sub_path
            ):
                fault.times -= 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is None:
                    return None
                if provider == "jogg":
                    code = fault.jogg_code if fault.jogg_code is not None else fault.status
                    body = fault.body or {"code": code, "msg": "injected fault", "data": None}
                elif provider == "argil":
                    body = fault.body or {"code": fault.status, "message": "injected fault"}
                else:
                    body = fault.body or {"error": "injected fault"}
                headers = {"retry-after": "0"} if fault.status == 429 else None
                return JSONResponse(body, status_code=fault.status, headers=headers)
        return None

    async def _gate(self, provider: str, request: Request, sub_path: str) -> Response | None:
        self.requests.append((provider, request.method, sub_path, time.monotonic()))
        fault = await self._fault(provider, request, sub_path)
        if fault is not None:
            return fault
        if not self._authorized(request):
            if provider == "tavus":
                return JSONResponse({"message": "Invalid access token"}, status_code=401)
            if provider == "argil":
                return JSONResponse({"code": 401, "message": "Unauthorized"}, status_code=401)
            return _jogg(10105, "Invalid API key")
        if provider == "jogg" and request.method == "POST" and self.jogg_posts_per_minute:
            now = time.monotonic()
            recent = [
                t
                for p, m, _, t in self.requests[:-1]
                if p == "jogg" and m == "POST" and t > now - 60
            ]
            if len(recent) >= self.jogg_posts_per_minute:
                return JSONResponse(
                    {"code": 429, "msg": "Rate limit exceeded", "data": None}, status_code=429
                )
        return None

    def _serve(self, video: FakeVideo, status: str) -> None:
        seen = self.served.setdefault((video.provider, video.id), [])
        if not seen or seen[-1] != status:
            seen.append(status)

    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            task = asyncio.create_task(self._deliverer())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        app = FastAPI(title="fake video providers", lifespan=lifespan)

        @app.api_route("/{provider}/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def dispatch(provider: str, path: str, request: Request) -> Response:
            prefixes = {"tavus": "", "argil": "v1/", "jogg": "v2/"}
            if provider not in prefixes or not path.startswith(prefixes[provider]):
                return JSONResponse({"error": "not found"}, status_code=404)
            sub = "/" + path[len(prefixes[provider]) :]
            gate = await self._gate(provider, request, sub)
            if gate is not None:
                return gate
            body: dict[str, Any] = {}
            if request.method in ("POST", "PUT"):
                raw = await request.body()
                try:
                    parsed = json.loads(raw) if raw.strip() else {}
                except json.JSONDecodeError:
                    parsed = None
                if not isinstance(parsed, dict):
                    return _bad(provider, "body must be a JSON object")
                body = parsed
            handler = {"tavus": self._tavus, "argil": self._argil, "jogg": self._jogg}[provider]
            return handler(request.method, sub.rstrip("/") or "/", body, request)

        return app

    # -- Tavus ----------------------------------------------------------------------------------

    def _tavus_object(self, video: FakeVideo) -> dict[str, Any]:
        status = self.status_of(video)
        obj: dict[str, Any] = {
            "video_id": video.id,
            "video_name": video.name,
            "status": status,
            "replica_id": video.body.get("replica_id"),
            "data": {"script": video.script},
            "hosted_url": f"https://videos.example.test/video/{video.id}",
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime()),
            "updated_at": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime()),
            "generation_progress": "100/100" if status == "ready" else "0/100",
            "status_details": "Your request has processed successfully!"
            if status == "ready"
            else ("Video generation failed" if status == "error" else "In progress"),
        }
        if status == "ready":
            obj["download_url"] = self._url(video)
            obj["stream_url"] = f"https://stream.example.test/{video.id}.m3u8"
        return obj

    def _tavus(self, method: str, path: str, body: dict[str, Any], request: Request) -> Response:
        if method == "POST" and path == "/v2/videos":
            if not body.get("replica_id"):
                return JSONResponse({"error": "replica_id is required"}, status_code=400)
            if ("script" in body) == ("audio_url" in body):
                return JSONResponse(
                    {"error": "Exactly one of script or audio_url is required"}, status_code=400
                )
            self.creates["tavus"].append(body)
            video = FakeVideo(
                "tavus",
                uuid.uuid4().hex[:10],
                body,
                str(body.get("video_name") or "video"),
                str(body.get("script") or ""),
                time.monotonic(),
                time.monotonic(),
                callback_url=body.get("callback_url"),
            )
            self.videos[("tavus", video.id)] = video
            obj = self._tavus_object(video)
            self._serve(video, obj["status"])
            return JSONResponse(
                {
                    k: obj[k]
                    for k in ("video_id", "video_name", "status", "hosted_url", "created_at")
                }
            )
        if method == "GET" and path.startswith("/v2/videos/"):
            found = self.videos.get(("tavus", path.rsplit("/", 1)[1]))
            if found is None or found.deleted:
                return JSONResponse({"error": "Video not found"}, status_code=404)
            obj = self._tavus_object(found)
            self._serve(found, obj["status"])
            return JSONResponse(obj)
        if method == "GET" and path == "/v2/replicas":
            return JSONResponse(
                {
                    "data": [
                        {"replica_id": "r79e1c033f", "replica_name": "Anna", "status": "completed"},
                        {"replica_id": "r5f0577fc8", "replica_name": "Ben", "status": "completed"},
                    ],
                    "total_count": 2,
                }
            )
        return JSONResponse({"error": "Not found"}, status_code=404)

    # -- Argil ----------------------------------------------------------------------------------

    def _argil_object(self, video: FakeVideo) -> dict[str, Any]:
        status = self.status_of(video)
        return {
            "id": video.id,
            "name": video.name,
            "status": status,
            "videoUrl": self._url(video) if status == "DONE" else None,
            "moments": video.body.get("moments"),
            "extras": video.extras,
            "createdAt": "2026-11-07T05:31:56Z",
            "updatedAt": "2026-11-07T05:33:10Z",
        }

    def _argil(self, method: str, path: str, body: dict[str, Any], request: Request) -> Response:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/videos":
            moments = body.get("moments")
            if not isinstance(moments, list) or not moments:
                return _argil_error(400, "moments must be a non-empty array")
            for moment in moments:
                if not isinstance(moment, dict) or not moment.get("avatarId"):
                    return _argil_error(400, "every moment needs an avatarId")
                if len(str(moment.get("transcript") or "")) > 250:
                    return _argil_error(400, "transcript must be at most 250 characters")
            extras = body.get("extras") or {}
            if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
                return _argil_error(400, "extras must map strings to strings")
            self.creates["argil"].append(body)
            video = FakeVideo(
                "argil",
                str(uuid.uuid4()),
                body,
                str(body.get("name") or "video"),
                " ".join(str(m.get("transcript") or "") for m in moments),
                time.monotonic(),
                None,
                extras=extras,
            )
            self.videos[("argil", video.id)] = video
            obj = self._argil_object(video)
            self._serve(video, obj["status"])
            return JSONResponse(obj, status_code=201)
        if parts[0] == "videos" and len(parts) >= 2:
            found = self.videos.get(("argil", parts[1]))
            if found is None or found.deleted:
                return _argil_error(404, "Video not found")
            if method == "POST" and parts[2:] == ["render"]:
                if found.started is None:
                    found.started = time.monotonic()
                obj = self._argil_object(found)
                self._serve(found, obj["status"])
                return JSONResponse(obj)
            if method == "GET" and len(parts) == 2:
                obj = self._argil_object(found)
                self._serve(found, obj["status"])
                return JSONResponse(obj)
            if method == "DELETE" and len(parts) == 2:
                found.deleted = True
                return JSONResponse({"id": found.id, "deleted": True})
        if method == "GET" and path == "/videos":
            page = int(request.query_params.get("page", 1))
            limit = int(request.query_params.get("limit", 10))
            items = [self._argil_object(v) for v in self.videos.values() if v.provider == "argil"]
            total = len(items)
            return JSONResponse(
                {
                    "totalItems": total,
                    "totalPages": max(1, -(-total // limit)),
                    "currentPage": page,
                    "itemsPerPage": limit,
                    "videos": items[(page - 1) * limit : page * limit],
                }
            )
        if method == "GET" and path == "/avatars":
            return JSONResponse(
                [
                    {
                        "id": "a1b2c3d4-0000-4000-8000-000000000001",
                        "name": "Maya",
                        "status": "IDLE",
                    },
                    {"id": "a1b2c3d4-0000-4000-8000-000000000003", "name": "Sam", "status": "IDLE"},
                ]
            )
        if method == "GET" and path == "/voices":
            return JSONResponse([{"id": "v1b2c3d4-0000-4000-8000-000000000002", "name": "Warm"}])
        if parts[0] == "webhooks":
            return self._argil_webhooks(method, parts, body)
        return _argil_error(404, "Not found")

    def _argil_webhooks(self, method: str, parts: list[str], body: dict[str, Any]) -> Response:
        if method == "GET" and len(parts) == 1:
            return JSONResponse(list(self.argil_webhooks.values()))
        if method == "POST" and len(parts) == 1:
            if not body.get("callbackUrl") or not body.get("events"):
                return _argil_error(400, "callbackUrl and events are required")
            hook = {
                "id": str(uuid.uuid4()),
                "callbackUrl": body["callbackUrl"],
                "events": list(body["events"]),
                "createdAt": "2026-11-07T05:31:56Z",
            }
            self.argil_webhooks[hook["id"]] = hook
            return JSONResponse(hook, status_code=201)
        if len(parts) == 2 and parts[1] in self.argil_webhooks:
            if method == "PUT":
                hook = self.argil_webhooks[parts[1]]
                hook.update({k: body[k] for k in ("callbackUrl", "events") if k in body})
                return JSONResponse(hook)
            if method == "DELETE":
                return JSONResponse(self.argil_webhooks.pop(parts[1]))
        return _argil_error(404, "Webhook not found")

    # -- JoggAI ---------------------------------------------------------------------------------

    def _jogg_object(self, video: FakeVideo) -> dict[str, Any]:
        status = self.status_of(video)
        return {
            "video_id": video.id,
            "status": status,
            "video_url": self._url(video) if status == "completed" else "",
            "cover_url": f"{self.public_url}/covers/{video.id}.jpg"
            if status == "completed"
            else "",
            "created_at": int(time.time()),
            "duration": 30 if status == "completed" else 0,
        }

    def _jogg(self, method: str, path: str, body: dict[str, Any], request: Request) -> Response:
        if method == "POST" and path == "/create_video_from_avatar":
            avatar = body.get("avatar")
            voice = body.get("voice")
            if not isinstance(avatar, dict) or not isinstance(avatar.get("avatar_id"), int):
                return _jogg(40000, "avatar.avatar_id must be an integer")
            if not isinstance(voice, dict) or voice.get("type") not in ("script", "audio"):
                return _jogg(40000, "voice.type must be script or audio")
            if voice["type"] == "script" and not (voice.get("script") and voice.get("voice_id")):
                return _jogg(40000, "voice.script and voice.voice_id are required")
            if voice["type"] == "audio" and not voice.get("audio_url"):
                return _jogg(40000, "voice.audio_url is required")
            self.creates["jogg"].append(body)
            video = FakeVideo(
                "jogg",
                f"video_{uuid.uuid4().hex[:8]}",
                body,
                str(body.get("video_name") or "video"),
                str(voice.get("script") or ""),
                time.monotonic(),
                time.monotonic(),
                callback_url=body.get("webhook_url"),
            )
            self.videos[("jogg", video.id)] = video
            self._serve(video, self.status_of(video))
            return _jogg(0, "Success", {"video_id": video.id})
        if method == "GET" and path.startswith("/avatar_video/"):
            found = self.videos.get(("jogg", path.rsplit("/", 1)[1]))
            if found is None or found.deleted:
                return _jogg(10104, "Video not found")
            obj = self._jogg_object(found)
            self._serve(found, obj["status"])
            return _jogg(0, "Success", obj)
        if method == "GET" and path == "/avatars/public":
            return _jogg(
                0,
                "Success",
                {"avatars": [{"id": 127, "name": "Ava", "cover_url": ""}], "total": 1},
            )
        if method == "GET" and path == "/voices":
            return _jogg(
                0,
                "Success",
                {"voices": [{"voice_id": "en-US-ava", "name": "Ava"}], "has_more": False},
            )
        if method == "GET" and path == "/endpoints":
            return _jogg(0, "Success", list(self.jogg_endpoints.values()))
        if method == "POST" and path == "/endpoint":
            if not body.get("url"):
                return _jogg(40000, "url is required")
            endpoint = {
                "endpoint_id": f"ep_{uuid.uuid4().hex[:8]}",
                "url": body["url"],
                "secret": "whsec_" + secrets.token_hex(16),
                "status": body.get("status", "enabled"),
                "events": list(body.get("events") or []),
                "created_at": int(time.time()),
            }
            self.jogg_endpoints[endpoint["endpoint_id"]] = endpoint
            return _jogg(0, "Success", endpoint)
        if path.startswith("/endpoint/"):
            endpoint_id = path.rsplit("/", 1)[1]
            found_ep = self.jogg_endpoints.get(endpoint_id)
            if found_ep is None:
                return _jogg(10104, "Endpoint not found")
            if method == "PUT":
                found_ep.update({k: body[k] for k in ("url", "status", "events") if k in body})
                return _jogg(0, "Success", {k: v for k, v in found_ep.items() if k != "secret"})
            if method == "DELETE":
                del self.jogg_endpoints[endpoint_id]
                return _jogg(0, "Success", None)
        return _jogg(10104, "Not found")

    # -- webhook deliveries ---------------------------------------------------------------------

    async def _deliverer(self) -> None:
        tick = max(0.01, min(self.stage_seconds / 2, 0.5))
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                await asyncio.sleep(tick)
                if not self.deliver_webhooks:
                    continue
                for video in list(self.videos.values()):
                    if video.delivered or video.started is None or not self._done(video):
                        continue
                    video.delivered = True
                    for url, payload, headers in self._webhooks_for(video):
                        await self._post(client, video.provider, url, payload, headers)

    async def _post(
        self,
        client: httpx.AsyncClient,
        provider: str,
        url: str,
        payload: dict[str, Any],
        headers: dict[str, str],
    ) -> None:
        raw = json.dumps(payload).encode()
        record: dict[str, Any] = {"provider": provider, "url": url, "payload": payload}
        try:
            response = await client.post(
                url, content=raw, headers={"content-type": "application/json", **headers}
            )
            record["status"] = response.status_code
        except httpx.HTTPError as exc:
            record["error"] = type(exc).__name__
        self.deliveries.append(record)

    def _webhooks_for(self, video: FakeVideo) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
        ok = not video.fails
        out: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        if video.provider == "tavus" and video.callback_url:
            out.append((video.callback_url, self._tavus_object(video), {}))
        elif video.provider == "argil":
            event = "VIDEO_GENERATION_SUCCESS" if ok else "VIDEO_GENERATION_FAILED"
            payload: dict[str, Any] = {
                "event": event,
                "data": {
                    "videoId": video.id,
                    "videoName": video.name,
                    "videoUrl": self._url(video) if ok else "",
                    "extras": video.extras,
                },
            }
            for hook in self.argil_webhooks.values():
                if event in hook["events"]:
                    out.append((hook["callbackUrl"], payload, {}))
        elif video.provider == "jogg":
            event = "generated_avatar_video_success" if ok else "generated_avatar_video_failed"
            data: dict[str, Any] = {"video_id": video.id, "status": "completed" if ok else "failed"}
            if ok:
                obj = self._jogg_object(video)
                data.update({k: obj[k] for k in ("video_url", "cover_url", "duration")})
            else:
                data["error"] = {"code": 50000, "message": "Video generation failed"}
            payload = {
                "event_id": f"evt_{uuid.uuid4().hex[:12]}",
                "event": event,
                "timestamp": int(time.time()),
                "data": data,
            }
            if video.callback_url:
                out.append((video.callback_url, payload, {"X-Webhook-Event": event}))
            raw = json.dumps(payload).encode()
            for endpoint in self.jogg_endpoints.values():
                if event in endpoint["events"] and endpoint["status"] == "enabled":
                    signature = hmac.new(
                        endpoint["secret"].encode(), raw, hashlib.sha256
                    ).hexdigest()
                    out.append(
                        (
                            endpoint["url"],
                            payload,
                            {"X-Webhook-Signature": signature, "X-Webhook-Event": event},
                        )
                    )
        return out


def _jogg(code: int, msg: str, data: Any = None) -> JSONResponse:
    """JoggAI's envelope. Errors too are HTTP 200 here: clients must read `code`."""
    return JSONResponse({"code": code, "msg": msg, "data": data})


def _argil_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _bad(provider: str, message: str) -> JSONResponse:
    if provider == "jogg":
        return _jogg(40000, message)
    if provider == "argil":
        return _argil_error(400, message)
    return JSONResponse({"error": message}, status_code=400)
