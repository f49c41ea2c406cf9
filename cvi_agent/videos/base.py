"""One small interface over the avatar-video providers (Tavus, Argil, JoggAI).

Every provider renders a talking-avatar video asynchronously: create a job, then learn the
result by webhook or by polling. Whatever the provider says is normalized into one
`VideoEvent` (`queued | rendering | ready | failed`), which is what the store, the poller and
the tool speak. The provider modules know the wire; nothing outside them does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol

import httpx

from cvi_agent import __version__
from cvi_agent.protocol.timestamps import in_range

log = logging.getLogger(__name__)

VideoStatus = Literal["queued", "rendering", "ready", "failed"]
PENDING: tuple[VideoStatus, ...] = ("queued", "rendering")
TERMINAL: tuple[VideoStatus, ...] = ("ready", "failed")
PROVIDERS = ("tavus", "argil", "jogg")


@dataclass(slots=True)
class VideoEvent:
    """What a provider said about one video, normalized.

    `kind` is the provider's own event name when there is one (`VIDEO_GENERATION_SUCCESS`,
    `generated_avatar_video_failed`, `video.ready` for Tavus) or ours (`video.created`,
    `video.status` for a polled status). `raw` is the provider's object, kept as received.
    """

    provider: str
    video_id: str
    status: VideoStatus
    url: str | None = None
    error: str | None = None
    conversation_id: str | None = None
    kind: str = "video.status"
    raw: dict[str, Any] = field(default_factory=dict)
    occurred_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "video_id": self.video_id,
            "status": self.status,
            "url": self.url,
            "error": self.error,
            "conversation_id": self.conversation_id,
            "kind": self.kind,
        }


@dataclass(slots=True)
class Delivery:
    """One webhook delivery, parsed: how to deduplicate it and the video event it carries.

    `event` is None for deliveries that are not about a video render (Argil avatar training,
    unknown JoggAI events): those are kept raw and acknowledged, nothing more.
    """

    provider: str
    kind: str
    dedupe_key: str
    event: VideoEvent | None
    conversation_id: str | None = None


@dataclass(slots=True)
class CreateVideo:
    """A render request. Exactly one of `script` and `audio_url`.

    `extra` is merged into the provider's request body as is (e.g. Argil `aspectRatio`,
    JoggAI `aspect_ratio`, Tavus `fast`): provider features without a common name.
    """

    avatar: str
    script: str | None = None
    audio_url: str | None = None
    voice: str | None = None
    title: str | None = None
    conversation_id: str | None = None
    callback_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.avatar:
            raise ValueError("an avatar is required")
        if (self.script is None) == (self.audio_url is None):
            raise ValueError("give exactly one of script and audio_url")
        if self.script is not None and not self.script.strip():
            raise ValueError("the script is empty")


@dataclass(slots=True)
class Avatar:
    id: str
    name: str
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Voice:
    id: str
    name: str
    raw: dict[str, Any] = field(default_factory=dict)


class ProviderError(Exception):
    """A provider refused or failed a request. `str()` is safe to log and to show a user.

    `video_id` is set when the provider already created the video (e.g. Argil accepted the
    video but refused to render it), so the caller can record what exists.
    """

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        code: int | str | None = None,
        retryable: bool = False,
        video_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable
        self.video_id = video_id

    def __str__(self) -> str:
        details = []
        if self.status is not None:
            details.append(f"HTTP {self.status}")
        if self.code is not None and self.code != self.status:
            details.append(f"code {self.code}")
        suffix = f" ({', '.join(details)})" if details else ""
        return f"{self.provider}: {self.message}{suffix}"


class ProviderNotConfigured(ProviderError):
    """No API key for this provider: set it in the environment."""


class VideoProvider(Protocol):
    """What every provider client offers. Implementations: TavusVideos, ArgilVideos, JoggVideos."""

    name: str

    async def create_video(self, request: CreateVideo) -> VideoEvent: ...

    async def get_video(self, video_id: str) -> VideoEvent: ...

    async def list_avatars(self) -> list[Avatar]: ...

    async def list_voices(self) -> list[Voice]: ...

    def parse_webhook(self, payload: Mapping[str, Any]) -> Delivery: ...

    async def aclose(self) -> None: ...


# -- HTTP with bounded retries ------------------------------------------------------------------


@dataclass(slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; `Retry-After` is honoured up to `max_delay`."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_delay))
        backoff: float = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)


class RequestPacer:
    """At most `limit` acquisitions in any sliding window of `period` seconds (JoggAI: 20 POST/min).

    Callers wait for a free slot (a provider's limit is a pace to keep, not a reason to fail,
    unlike `web.security.RateLimiter`, which refuses); a caller with a deadline
    (`asyncio.timeout`) gives up cleanly.
    One limiter per client, so per process: the provider's limit is per key, and several
    processes sharing one key must split it (see README, "JoggAI").
    """

    def __init__(
        self, limit: int, period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or period <= 0:
            raise ValueError("limit must be >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._clock = clock
        self._stamps: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                while self._stamps and self._stamps[0] <= now - self.period:
                    self._stamps.popleft()
                if len(self._stamps) < self.limit:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self._stamps[0] + self.period - now)


RetryDecision = Callable[[httpx.Response, bool], bool]


def default_should_retry(response: httpx.Response, idempotent: bool) -> bool:
    """429 always (nothing was done); 5xx when repeating is harmless.

    A create is not idempotent (no provider offers idempotency keys), so a POST is retried on
    a 5xx only when the server says it did not take the request (503); a 500/502/504 on a
    create may have created the video, and a second one would be billed twice.
    """
    status = response.status_code
    if status == 429:
        return True
    if status >= 500:
        return idempotent or status == 503
    return False


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class ProviderHttp:
    """An `httpx.AsyncClient` for one provider: base URL, key header, timeouts, retries."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
        limiter: RequestPacer | None = None,
        should_retry: RetryDecision = default_should_retry,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ProviderNotConfigured(provider, f"no API key configured for {provider}")
        self.provider = provider
        self.retry = retry or RetryPolicy()
        self.limiter = limiter
        self.should_retry = should_retry
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers={
                "x-api-key": api_key,
                "accept": "application/json",
                "user-agent": f"cvi-agent/{__version__}",
            },
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """The response of the last attempt (any status); raises only when unreachable."""
        if idempotent is None:
            idempotent = method.upper() != "POST"
        attempt = 0
        while True:
            attempt += 1
            if self.limiter is not None and method.upper() == "POST":
                await self.limiter.acquire()
            try:
                response = await self.client.request(
                    method, path.lstrip("/"), json=json_body, params=params
                )
            except httpx.TransportError as exc:
                # A request that never connected was not processed: safe to repeat even a create.
                unsent = isinstance(
                    exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                )
                if attempt >= self.retry.attempts or not (idempotent or unsent):
                    raise ProviderError(
                        self.provider,
                        f"cannot reach the API ({type(exc).__name__})",
                        retryable=True,
                    ) from exc
                delay = self.retry.delay(attempt)
                log.warning(
                    "%s %s %s: %s; retry %d in %.2fs",
                    self.provider,
                    method,
                    path,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if attempt < self.retry.attempts and self.should_retry(response, idempotent):
                delay = self.retry.delay(attempt, _retry_after(response))
                log.warning(
                    "%s %s %s: HTTP %d; retry %d in %.2fs",
                    self.provider,
                    method,
                    path,
                    response.status_code,
                    attempt,
                    delay,
                )
                await response.aclose()
                await asyncio.sleep(delay)
                continue
            return response


class ProviderClient:
    """What every provider client shares: its `ProviderHttp` (key, timeouts, retries, an
    optional rate limiter) and closing it. Subclasses set `name` and `default_url`, and may
    override `default_limiter` and `retry_decision`."""

    name: str
    default_url: ClassVar[str]

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
        limiter: RequestPacer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = ProviderHttp(
            self.name,
            base_url or self.default_url,
            api_key,
            timeout=timeout,
            retry=retry,
            limiter=limiter or self.default_limiter(),
            should_retry=self.retry_decision,
            transport=transport,
        )

    def default_limiter(self) -> RequestPacer | None:
        return None

    @staticmethod
    def retry_decision(response: httpx.Response, idempotent: bool) -> bool:
        return default_should_retry(response, idempotent)

    async def aclose(self) -> None:
        await self.http.aclose()


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None


def as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def http_error(
    provider: str,
    response: httpx.Response,
    what: str,
    message_keys: tuple[str, ...],
    *,
    numeric_code: bool = False,
    video_id: str | None = None,
) -> ProviderError:
    """The `ProviderError` for an HTTP error answer: the first of `message_keys` the body
    carries (else the reason phrase), the body's integer `code` when `numeric_code`, and
    retryable for 429 and 5xx."""
    body = as_dict(json_or_none(response))
    texts = (text_or_none(body.get(key)) for key in message_keys)
    message = next((t for t in texts if t), None) or response.reason_phrase or "error"
    code = body.get("code")
    return ProviderError(
        provider,
        f"{what}: {message}",
        status=response.status_code,
        code=code if numeric_code and isinstance(code, int) else None,
        retryable=response.status_code == 429 or response.status_code >= 500,
        video_id=video_id,
    )


def list_items(body: Any, *keys: str) -> list[dict[str, Any]]:
    """The objects of a list response: a bare array, or the first of `keys` that holds one
    (providers wrap lists differently, and sometimes not at all)."""
    if isinstance(body, dict):
        for key in keys:
            if isinstance(body.get(key), list):
                body = body[key]
                break
    if not isinstance(body, list):
        return []
    return [dict(item) for item in body if isinstance(item, dict)]


def text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_time(value: Any) -> float | None:
    """Unix seconds from the date formats providers send: numbers, ISO 8601, `Y-m-d H:M:S.f`;
    None for anything else, including times before 1970 or after 9999."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            return None
        return in_range(number / 1000.0 if number > 1e12 else number)
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return in_range(number / 1000.0 if number > 1e12 else number)
    text = text.replace("Z", "+00:00").replace("z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        for fmt in ("%a, %d %b %Y %H:%M:%S %Z", "%Y/%m/%d %H:%M:%S"):
            try:
                parsed = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        else:
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return in_range(parsed.timestamp())


def content_key(payload: Mapping[str, Any]) -> str:
    """A stable key for a delivery that carries no id of its own: a hash of its content."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
