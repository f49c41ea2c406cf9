"""Who may call what: an API key on every route but an explicit allow-list, a token bucket per
key, and CORS only for the origins `CVI_CORS_ORIGINS` names.

`AccessControl` is plain ASGI middleware in front of routing, so a route added later is
protected by default; the routers' own key checks (`require_key` dependencies, the live
websocket's handshake check) stay as a second line. The allow-list is `public_paths()`:
liveness, the console's static files and the OpenAPI docs (public on purpose: they hold no
secret and describe the same API the README does), plus the provider callbacks under
`/callbacks/`, which authenticate with their own URL token or HMAC signature (callbacks.py,
videos/webhooks.py) because Tavus and the video providers cannot send our API key.
`tests/test_security.py` enumerates `app.routes` and fails for any route outside that list that
answers without a key.

Rate limiting is per API key and per process (with `--workers N` each worker has its own
buckets). It runs on the event loop's thread with no `await` between reading and writing a
bucket, so it needs no lock; each request costs one dict lookup and a few float operations.
Only accepted keys get a bucket, so the table is as small as `CVI_API_KEYS`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from cvi_agent import metrics
from cvi_agent.config import Settings
from cvi_agent.web.auth import constant_time_in, presented_key
from cvi_agent.web.errors import ApiError

#: Paths whose callers authenticate otherwise (a URL token or an HMAC signature).
CALLBACK_PREFIX = "/callbacks/"
#: The LLM endpoint's paths: refusals there are counted in `cvi_chat_requests` too.
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
WS_KEY_PROTOCOL_PREFIXES = ("bearer.", "key.")

log = logging.getLogger(__name__)


def public_paths(app: FastAPI) -> frozenset[str]:
    """Exact paths anyone may fetch: liveness, the console page, the OpenAPI docs."""
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    return frozenset({"/healthz", "/", "/console", *(p for p in docs if p)})


def is_public(path: str, exact: frozenset[str]) -> bool:
    """Whether `path` needs no API key (see the module docstring for why each is public)."""
    return path in exact or path.startswith(("/console/", CALLBACK_PREFIX))


class RateLimiter:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up.

    Not thread-safe by design: call it from one event loop (no lock on the hot path).
    """

    __slots__ = ("_buckets", "burst", "clock", "rate")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill]

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Spend one token of `key`'s bucket: 0.0 when allowed, else seconds until one is due."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self.burst - 1.0, now]
            return 0.0
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


def websocket_key(headers: Headers, query_string: bytes) -> str | None:
    """The key of a websocket handshake: a header, `?key=K`, or the subprotocol `bearer.K` /
    `key.K` (browsers cannot set headers on a websocket)."""
    key = presented_key(headers)
    if key:
        return key
    if b"key=" in query_string:
        for name, value in parse_qsl(query_string.decode("latin-1")):
            if name == "key" and value.strip():
                return value.strip()
    for proto in headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        for prefix in WS_KEY_PROTOCOL_PREFIXES:
            if proto.startswith(prefix) and len(proto) > len(prefix):
                return proto[len(prefix) :]
    return None


_NUL_IN_URL = ApiError(400, "NUL characters are not allowed in URLs.", "invalid_url")


class AccessControl:
    """ASGI middleware: the API-key check and the per-key rate limit for every non-public
    HTTP request and websocket handshake. Refusals use the OpenAI error shape (a websocket
    handshake is refused with the same HTTP response when the server supports it, else
    closed with 4401 / 4429)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, limiter: RateLimiter, public: frozenset[str]
    ) -> None:
        self.app = app
        self.settings = settings
        self.limiter = limiter
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            # No id we store can hold a NUL (PostgreSQL refuses them): refuse, don't look it up.
            await self._refuse(scope, receive, send, _NUL_IN_URL)
            return
        if is_public(path, self.public):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if kind == "http":
            key = presented_key(headers)
        else:
            key = websocket_key(headers, scope.get("query_string", b""))
        error: ApiError | None = None
        if not key:
            error = ApiError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                "missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif not constant_time_in(key, self.settings.api_keys):
            error = ApiError(
                401, "Invalid API key.", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        elif self.limiter.enabled:
            wait = self.limiter.take(key)
            if wait:
                error = rate_limited(self.limiter, wait)
        if error is None:
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send, error)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        if scope["type"] == "http":
            if scope["path"] in CHAT_PATHS:
                metrics.request_done("unknown", error.status)
            await error.response()(scope, receive, send)
        else:
            await deny_websocket(WebSocket(scope, receive, send), error)


def rate_limited(limiter: RateLimiter, wait: float) -> ApiError:
    return ApiError(
        429,
        f"Rate limit exceeded for this API key ({limiter.rate:g} requests per second, bursts of "
        f"{limiter.burst:g}, per server process); retry after {wait:.3f} s.",
        "rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


async def deny_websocket(ws: WebSocket, error: ApiError) -> None:
    """Refuse a handshake with the HTTP error when the server can, else close with 4xxx.

    Logged here, once, with the reason (INFO: the client's doing, not ours); the path is logged
    without its query string, which may hold a key. `web/logs.DenialLines` drops uvicorn's own
    status-only line for the same refusal."""
    client = ws.client
    log.info(
        "%s - websocket %s refused: %d %s (%s)",
        f"{client.host}:{client.port}" if client else "-",
        ws.scope["path"],
        error.status,
        error.message,
        error.code,
    )
    try:
        await ws.send_denial_response(error.response())
    except RuntimeError:
        await ws.close(4000 + error.status, error.message[:120])


def install_security(app: FastAPI, settings: Settings) -> RateLimiter:
    """Add access control and, when `CVI_CORS_ORIGINS` lists origins, CORS (outermost, so a
    preflight is answered without a key and refusals carry the CORS headers)."""
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app.add_middleware(
        AccessControl,
        settings=settings,
        limiter=limiter,
        public=public_paths(app),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.state.rate_limiter = limiter
    return limiter
