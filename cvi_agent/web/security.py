"""Who may call what: an API key on every route but an explicit allow-list, a token bucket per
key, and CORS only for the origins `CVI_CORS_ORIGINS` names.

`AccessControl` is plain ASGI middleware in front of routing, so a route added later is
protected by default; the routers' own key checks (`require_key` dependencies, the live
websocket's handshake check) stay as a second line. The allow-list is `public_paths()`:
liveness and readiness, the console's static files and icon and the OpenAPI docs (public on purpose: they hold no
secret and describe the same API the README does), plus the provider callbacks under
`/callbacks/`, which authenticate with their own URL token or HMAC signature (callbacks.py,
videos/webhooks.py) because Tavus and the video providers cannot send our API key.
`tests/test_web_security.py` enumerates `app.routes` and fails for any route outside that list that
answers without a key.

Rate limiting is per API key and per process (with `--workers N` each worker has its own
buckets), on three measures, each refused with 429 and `Retry-After`: requests
(`CVI_RATE_LIMIT_RPS`), request bytes (`CVI_RATE_LIMIT_BYTES` per second: a key sending large
bodies at a few percent of its request rate could otherwise keep the event loop parsing them,
and every other key waits), and requests in flight (`CVI_RATE_LIMIT_CONCURRENT`: a streaming
reply or a live feed holds its slot until it ends). The bytes are charged on the declared
`Content-Length` before the body is read, so a refused body costs the loop nothing but
discarding it; a chunked body is charged as it arrives and may leave the key in debt, which
later requests wait out. It all runs on the event loop's thread with no `await` between reading
and writing a bucket, so it needs no lock; each request costs a few dict lookups and float
operations. Only accepted keys get a bucket, so the tables are as small as `CVI_API_KEYS`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from cvi_agent import metrics
from cvi_agent.config import Settings
from cvi_agent.web.access import facts_of, key_tail
from cvi_agent.web.auth import constant_time_in, presented_key
from cvi_agent.web.errors import ApiError

#: Paths whose callers authenticate otherwise (a URL token or an HMAC signature).
CALLBACK_PREFIX = "/callbacks/"
#: The LLM endpoint's paths: refusals there are counted in `cvi_chat_requests` too.
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")  # also the chat routes (llm/routes.py)
WS_KEY_PROTOCOL_PREFIXES = ("bearer.", "key.")


def public_paths(app: FastAPI) -> frozenset[str]:
    """Exact paths anyone may fetch: liveness and readiness (probes send no key; they say
    which part fails, never a secret), the console page and its icon, the OpenAPI docs."""
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    return frozenset(
        {"/healthz", "/readyz", "/", "/console", "/favicon.ico", *(p for p in docs if p)}
    )


def is_public(path: str, exact: frozenset[str]) -> bool:
    """Whether `path` needs no API key (see the module docstring for why each is public)."""
    return path in exact or path.startswith(("/console/", CALLBACK_PREFIX))


class RateLimiter:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up; a request
    costs one token (or its bytes, for the bytes limit).

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

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend `cost` tokens of `key`'s bucket (at most `burst`, so any cost can be paid
        once the bucket is full): 0.0 when allowed, else seconds until they are due."""
        if cost > self.burst:
            cost = self.burst
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self.burst - cost, now]
            return 0.0
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self.rate

    def charge(self, key: str, cost: float) -> None:
        """Spend `cost` tokens whether or not the bucket holds them (what has already arrived
        cannot be refused): the debt delays the key's next requests."""
        now = self.clock()
        bucket = self._buckets.setdefault(key, [self.burst, now])
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[0] = tokens - cost
        bucket[1] = now


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
        self,
        app: ASGIApp,
        settings: Settings,
        limiter: RateLimiter,
        public: frozenset[str],
        bytes_limiter: RateLimiter | None = None,
    ) -> None:
        """
        Args:
            app: the app behind the check.
            settings: the API keys and `CVI_RATE_LIMIT_CONCURRENT`.
            limiter: requests per second per key.
            public: exact paths that need no key (`public_paths`).
            bytes_limiter: request bytes per second per key (None: no bytes limit).
        """
        self.app = app
        self.settings = settings
        self.limiter = limiter
        self.public = public
        self.bytes = bytes_limiter if bytes_limiter is not None and bytes_limiter.enabled else None
        self.max_in_flight = settings.rate_limit_concurrent
        self.in_flight: dict[str, int] = {}

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
        else:
            facts = facts_of(scope)
            if facts is not None:
                facts.key_tail = key_tail(key)
            refused = self._throttle(key, headers, kind)
            if refused is None:
                await self._admit(key, scope, receive, send, headers)
                return
            error = refused
        await self._refuse(scope, receive, send, error)

    async def _admit(
        self, key: str, scope: Scope, receive: Receive, send: Send, headers: Headers
    ) -> None:
        if self.bytes is not None and "transfer-encoding" in headers:  # chunked: no length
            receive = self._charged(key, receive)
        if not self.max_in_flight:
            await self.app(scope, receive, send)
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.in_flight[key] - 1
            if left:
                self.in_flight[key] = left
            else:
                del self.in_flight[key]

    def _throttle(self, key: str, headers: Headers, kind: str) -> ApiError | None:
        """The per-key limits a request of `key` runs into, if any (the cheapest first; a
        refused request spends nothing of the limits it did not reach)."""
        if self.max_in_flight and self.in_flight.get(key, 0) >= self.max_in_flight:
            metrics.throttled("concurrent")
            return ApiError(
                429,
                f"Too many requests in flight for this API key ({self.max_in_flight}, streams "
                "included, per server process); retry when one has ended.",
                "concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        if self.limiter.enabled:
            wait = self.limiter.take(key)
            if wait:
                metrics.throttled("requests")
                return rate_limited(self.limiter, wait)
        if self.bytes is not None and kind == "http":
            declared = headers.get("content-length")
            size = int(declared) if declared is not None and declared.isdigit() else 0
            wait = self.bytes.take(key, size) if size else 0.0
            if wait:
                metrics.throttled("bytes")
                return ApiError(
                    429,
                    f"Request bytes limit exceeded for this API key ({self.bytes.rate:g} bytes "
                    f"per second, bursts of {self.bytes.burst:g}, per server process); retry "
                    f"after {wait:.3f} s.",
                    "bytes_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return None

    def _charged(self, key: str, receive: Receive) -> Receive:
        """`receive`, charging the bytes of a body without Content-Length as they arrive."""
        limiter = self.bytes
        assert limiter is not None

        async def charged() -> Message:
            message = await receive()
            body = message.get("body")
            if body:
                limiter.charge(key, len(body))
            return message

        return charged

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        facts = facts_of(scope)
        if facts is not None:
            facts.reason = error.code
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

    The request log's line for the handshake (`web/access.py`) says the status and the reason,
    without the query string, which may hold a key; `web/logs.DenialLines` drops uvicorn's own
    status-only line for the same refusal."""
    facts = facts_of(ws.scope)
    if facts is not None:
        facts.status, facts.reason = error.status, error.code
    try:
        await ws.send_denial_response(error.response())
    except RuntimeError:
        await ws.close(4000 + error.status, error.message[:120])


def install_security(app: FastAPI, settings: Settings) -> RateLimiter:
    """Add access control and, when `CVI_CORS_ORIGINS` lists origins, CORS (outermost, so a
    preflight is answered without a key and refusals carry the CORS headers)."""
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    # Never a burst below one largest body: that body could then never be sent.
    burst = max(settings.rate_limit_bytes_burst, settings.max_body_bytes)
    bytes_limiter = RateLimiter(settings.rate_limit_bytes, burst)
    app.add_middleware(
        AccessControl,
        settings=settings,
        limiter=limiter,
        public=public_paths(app),
        bytes_limiter=bytes_limiter,
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
