"""Tavus REST client (TAVUS_PROTOCOL §5): personas, conversations and interactions, over httpx.

Retries are bounded and only where they are safe: 429 and 502/503/504 (and connection
failures, where nothing reached Tavus) for every method, any 5xx or timeout for idempotent
ones. `Retry-After` is honoured up to `max_backoff`. Errors are typed, with Tavus's own message
(`{"error"}` or `{"message"}`). The API key is never logged in full. With a `limiter`, every
request first takes a slot of the key's client-side rate limit (`tavus/ratelimit.py`).

`send_app_message` (Tavus's "Send App Message": an interaction delivered to the replica without
joining the call) has its own policy, because a repeated interaction is a second thing said:
429 waits out `Retry-After` and 502 ("could not be delivered, please retry") is retried with
backoff, both within the caller's budget; a 504 ("may have been delivered; check before
retrying") or a timeout after the request went out is never retried (`TavusDeliveryUncertain`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from cvi_agent.config import mask_key
from cvi_agent.personas import Persona, tavus_persona_payload
from cvi_agent.tavus.ratelimit import RateLimiter, RateLimitTimeout

log = logging.getLogger(__name__)

DEFAULT_URL = "https://tavusapi.com"
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "PATCH"})
_RETRY_ALWAYS = frozenset({429, 502, 503, 504})
# Tavus refuses larger send-app-message bodies with 413 ("Request body exceeds 65536 bytes").
APP_MESSAGE_MAX_BYTES = 65_536
# How long a request waits for a slot of the key's client-side rate limit (not send-app-message,
# which waits within its caller's budget).
LIMIT_WAIT = 10.0


class TavusError(Exception):
    """A failed Tavus call. `status` is the HTTP status (0: no response at all)."""

    def __init__(
        self,
        message: str,
        status: int = 0,
        *,
        body: Any = None,
        retry_after: float | None = None,
        method: str = "",
        path: str = "",
        attempts: int = 1,
    ) -> None:
        """One failed call, as Tavus answered it.

        Args:
            message: Tavus's own message (or what went wrong on the way), safe to show.
            status: the HTTP status; 0 when no response came at all.
            body: Tavus's answer, parsed JSON when it was JSON.
            retry_after: seconds Tavus (or our own rate limit) asked us to wait, if it did.
            method: the HTTP method, for the error's text.
            path: the request path, for the error's text.
            attempts: how many times the request was sent before giving up.
        """
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.method = method
        self.path = path
        self.attempts = attempts

    def __str__(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        code = f"HTTP {self.status}: " if self.status else ""
        return f"Tavus {where}{code}{self.message}"


class TavusNotConfigured(TavusError):
    """No TAVUS_API_KEY."""


class TavusBadRequest(TavusError):
    """400/422: Tavus refused the request as invalid."""


class TavusAuthError(TavusError):
    """401/403: the Tavus API key is missing, wrong or lacks access."""


class TavusNotFound(TavusError):
    """404."""


class TavusRateLimited(TavusError):
    """429 after the allowed retries."""


class TavusUnavailable(TavusError):
    """5xx or no response after the allowed retries."""


class TavusConversationEnded(TavusError):
    """send-app-message: the conversation is not active, or its room is no longer available."""


class TavusPayloadTooLarge(TavusError):
    """send-app-message: the body is over `APP_MESSAGE_MAX_BYTES` (refused before sending,
    or by Tavus with 413)."""


class TavusNotDelivered(TavusUnavailable):
    """send-app-message: surely not delivered, even after the retries the budget allowed (502
    "could not be delivered", 503, or Tavus could not be reached): sending again is safe."""


class TavusDeliveryUncertain(TavusError):
    """send-app-message: it may have been delivered (504, another 5xx, or no answer after the
    request went out). Never retried blindly: check before sending it again."""


@dataclass(slots=True)
class AppMessageResult:
    """A delivered send-app-message: Tavus's answer and what it took.

    Args:
        status: the HTTP status Tavus answered (2xx).
        body: Tavus's answer (parsed JSON, text, or None when empty).
        attempts: how many times it was sent (more than one after a 429 or a 502).
        waited: seconds spent waiting (rate limit, `Retry-After`, backoff) before it went out.
    """

    status: int
    body: Any
    attempts: int
    waited: float


def _error_class(status: int) -> type[TavusError]:
    if status in (400, 409, 422):
        return TavusBadRequest
    if status in (401, 403):
        return TavusAuthError
    if status == 404:
        return TavusNotFound
    if status == 429:
        return TavusRateLimited
    if status >= 500 or status == 0:
        return TavusUnavailable
    return TavusError


def error_message(body: Any, fallback: str) -> str:
    """Tavus's message from `{"error": …}` or `{"message": …}` (strings or nested objects)."""
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
            if isinstance(value, dict):
                nested = error_message(value, "")
                if nested:
                    return nested
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return fallback


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - time.time())


def json_patch(current: dict[str, Any], desired: dict[str, Any], base: str = "") -> list[Any]:
    """RFC 6902 operations that make `current` hold every field of `desired`.

    Only adds and replaces: fields Tavus owns (ids, timestamps, defaults it filled in) are left
    alone. Objects are compared key by key; lists and scalars are replaced whole.
    """
    ops: list[Any] = []
    for key, value in desired.items():
        path = f"{base}/{_pointer(key)}"
        if key not in current:
            ops.append({"op": "add", "path": path, "value": value})
        elif isinstance(value, dict) and isinstance(current[key], dict):
            ops.extend(json_patch(current[key], value, path))
        elif current[key] != value:
            ops.append({"op": "replace", "path": path, "value": value})
    return ops


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@dataclass(slots=True)
class PushResult:
    persona_id: str
    created: bool
    operations: list[Any] = field(default_factory=list)


class TavusClient:
    """Tavus's REST API with one key (module doc: retries, typed errors, the rate limit)."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 15.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
        keyless: bool = False,
    ) -> None:
        """A client; nothing connects before the first request.

        Args:
            api_key: `TAVUS_API_KEY`; empty: every call raises `TavusNotConfigured`.
            base_url: `TAVUS_API_URL` (or a stand-in for Tavus on loopback).
            timeout: seconds per request (connecting: at most 5).
            max_retries: retries of a failed request where retrying is safe.
            backoff: first delay between retries, doubled each time (with jitter).
            max_backoff: longest delay between retries; a longer `Retry-After` is not waited.
            transport: an httpx transport (tests).
            limiter: the key's client-side rate limit, shared by every client of the process.
            keyless: a stand-in for Tavus that takes no key (the simulator's on loopback):
                calls go out without `x-api-key` instead of raising `TavusNotConfigured`.
        """
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.limiter = limiter
        self.keyless = keyless
        headers = {"user-agent": "cvi-agent"}
        if api_key:
            headers["x-api-key"] = api_key
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"TavusClient({self.base_url!r}, api_key={mask_key(self.api_key)!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> TavusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport -----------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        if not self.api_key and not self.keyless:
            raise TavusNotConfigured("TAVUS_API_KEY is not set", method=method, path=path)
        attempt = 0
        while True:
            retry_after: float | None = None
            await self._slot(LIMIT_WAIT, method, path)
            try:
                response = await self._http.request(method, path, json=json, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error: TavusError = TavusUnavailable(
                    f"cannot reach {self.base_url} ({type(exc).__name__})",
                    method=method,
                    path=path,
                )
                retryable = True
            except httpx.TransportError as exc:
                error = TavusUnavailable(
                    f"no response from {self.base_url} ({type(exc).__name__})",
                    method=method,
                    path=path,
                )
                retryable = method in _IDEMPOTENT
            else:
                if response.status_code < 400:
                    if not response.content:
                        return None
                    try:
                        return response.json()
                    except ValueError:
                        return response.text
                body = _body(response)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                status = response.status_code
                error = _error_class(status)(
                    error_message(body, response.reason_phrase or "request failed"),
                    status,
                    body=body,
                    retry_after=retry_after,
                    method=method,
                    path=path,
                )
                retryable = status in _RETRY_ALWAYS or (status >= 500 and method in _IDEMPOTENT)
            if not retryable or attempt >= self.max_retries:
                raise error
            delay = min(self.max_backoff, self.backoff * (2**attempt))
            delay *= 0.5 + random.random() / 2  # jitter
            if retry_after is not None:
                if retry_after > self.max_backoff:
                    raise error  # the caller decides whether to wait that long
                delay = retry_after
            attempt += 1
            log.info(
                "tavus %s %s: %s; retry %d/%d in %.2fs",
                method,
                path,
                error.message if error.status == 0 else f"HTTP {error.status}",
                attempt,
                self.max_retries,
                delay,
            )
            await asyncio.sleep(delay)

    async def _slot(self, max_wait: float, method: str, path: str) -> None:
        """One slot of the key's rate limit, or `TavusRateLimited` (nothing was sent)."""
        if self.limiter is None or not self.api_key:
            return
        try:
            await self.limiter.acquire(self.api_key, max_wait)
        except RateLimitTimeout as exc:
            raise TavusRateLimited(
                "our own limit of requests to Tavus for this key is reached",
                retry_after=exc.retry_after,
                method=method,
                path=path,
                attempts=0,
            ) from None

    # -- interactions --------------------------------------------------------------------------

    async def send_app_message(
        self,
        conversation_id: str,
        body: bytes,
        *,
        budget: float = 10.0,
        attempt_timeout: float = 5.0,
        max_attempts: int = 4,
    ) -> AppMessageResult:
        """POST one interaction (`body`: its exact JSON bytes) to the conversation's replica.

        Within `budget` seconds of waiting (rate limit, `Retry-After`, backoff): 429 is waited
        out, 502/503 and connection failures are retried (at most `max_attempts` sends, each
        answered within `attempt_timeout` seconds). Raises
        `TavusPayloadTooLarge` before sending a body over `APP_MESSAGE_MAX_BYTES`,
        `TavusConversationEnded`, `TavusRateLimited` / `TavusNotDelivered` (surely not
        delivered), `TavusDeliveryUncertain` (504, other 5xx, or no answer once sent), and
        `TavusAuthError` / `TavusBadRequest` / `TavusNotFound` as for any call.
        """
        method, path = (
            "POST",
            f"/v2/conversations/{quote(conversation_id, safe='')}/send-app-message",
        )
        if not self.api_key and not self.keyless:
            raise TavusNotConfigured("TAVUS_API_KEY is not set", method=method, path=path)
        if len(body) > APP_MESSAGE_MAX_BYTES:
            raise TavusPayloadTooLarge(
                f"the message is {len(body)} bytes; Tavus takes at most {APP_MESSAGE_MAX_BYTES}",
                413,
                method=method,
                path=path,
                attempts=0,
            )
        started = time.monotonic()
        deadline = started + max(0.0, budget)
        attempt = 0
        waited = 0.0
        while True:
            before = time.monotonic()
            await self._slot(max(0.0, deadline - before), method, path)
            waited += time.monotonic() - before
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self._http.post(
                    path,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(attempt_timeout, connect=min(attempt_timeout, 5.0)),
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error: TavusError = TavusNotDelivered(
                    f"cannot reach {self.base_url} ({type(exc).__name__})",
                    method=method,
                    path=path,
                    attempts=attempt,
                )
            except httpx.TransportError as exc:
                raise TavusDeliveryUncertain(
                    f"no answer from {self.base_url} once the message was sent "
                    f"({type(exc).__name__}); it may have been delivered",
                    method=method,
                    path=path,
                    attempts=attempt,
                ) from None
            else:
                status = response.status_code
                answer = _body(response) if response.content else None
                if status < 400:
                    return AppMessageResult(status, answer, attempt, waited)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                message = error_message(answer, response.reason_phrase or "request failed")
                error = _app_message_error(status, message)(
                    message,
                    status,
                    body=answer,
                    retry_after=retry_after,
                    method=method,
                    path=path,
                    attempts=attempt,
                )
                if not isinstance(error, TavusRateLimited | TavusNotDelivered):
                    raise error
            if attempt >= max_attempts:
                raise error
            if isinstance(error, TavusRateLimited):
                delay = (
                    retry_after if retry_after is not None else self.backoff * (2 ** (attempt - 1))
                )
            else:
                delay = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
                delay *= 0.5 + random.random() / 2  # jitter
            if time.monotonic() + delay > deadline:
                raise error  # waiting longer would break the caller's budget
            log.info(
                "tavus send-app-message to %s: %s; attempt %d in %.2fs",
                conversation_id,
                error.message if error.status == 0 else f"HTTP {error.status}",
                attempt + 1,
                delay,
            )
            waited += delay
            await asyncio.sleep(delay)

    # -- personas ------------------------------------------------------------------------------

    async def create_persona(self, payload: dict[str, Any]) -> dict[str, Any]:
        return _object(await self.request("POST", "/v2/personas", json=payload))

    async def get_persona(self, persona_id: str) -> dict[str, Any]:
        return _object(await self.request("GET", f"/v2/personas/{persona_id}"))

    async def patch_persona(self, persona_id: str, operations: list[Any]) -> Any:
        return await self.request("PATCH", f"/v2/personas/{persona_id}", json=operations)

    async def delete_persona(self, persona_id: str) -> None:
        await self.request("DELETE", f"/v2/personas/{persona_id}")

    async def list_personas(
        self, page_size: int = 100, max_pages: int = 50
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for page in range(1, max_pages + 1):
            body = await self.request(
                "GET", "/v2/personas", params={"limit": page_size, "page": page}
            )
            items = _items(body)
            found.extend(items)
            total = body.get("total_count") if isinstance(body, dict) else None
            if len(items) < page_size or (isinstance(total, int) and len(found) >= total):
                break
        return found

    async def find_persona(self, persona_name: str) -> dict[str, Any] | None:
        for item in await self.list_personas():
            if item.get("persona_name") == persona_name:
                return item
        return None

    async def push_persona(
        self,
        persona: Persona,
        public_url: str,
        api_key: str,
        replica_id: str | None = None,
        persona_id: str | None = None,
    ) -> PushResult:
        """Create the persona on Tavus, or bring the existing one (same `persona_name`, or
        `persona_id`) up to date with a JSON Patch. Pushing twice is a no-op the second time,
        apart from the LLM key, which Tavus does not echo back."""
        payload = tavus_persona_payload(persona, public_url, api_key, replica_id)
        existing: dict[str, Any] | None
        if persona_id:
            existing = await self.get_persona(persona_id)
        else:
            existing = await self.find_persona(payload["persona_name"])
        if existing is None:
            created = await self.create_persona(payload)
            return PushResult(str(created.get("persona_id") or ""), True)
        found_id = str(persona_id or existing.get("persona_id") or "")
        if not persona_id:
            existing = await self.get_persona(found_id)
        ops = json_patch(existing, payload)
        if ops:
            await self.patch_persona(found_id, ops)
        return PushResult(found_id, False, ops)

    # -- conversations -------------------------------------------------------------------------

    async def create_conversation(self, body: dict[str, Any]) -> dict[str, Any]:
        return _object(await self.request("POST", "/v2/conversations", json=body))

    async def get_conversation(self, conversation_id: str, verbose: bool = False) -> dict[str, Any]:
        params = {"verbose": "true"} if verbose else None
        return _object(
            await self.request("GET", f"/v2/conversations/{conversation_id}", params=params)
        )

    async def list_conversations(
        self, limit: int = 25, page: int = 1, status: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "page": page}
        if status:
            params["status"] = status
        body = await self.request("GET", "/v2/conversations", params=params)
        return body if isinstance(body, dict) else {"data": _items(body)}

    async def end_conversation(self, conversation_id: str) -> None:
        await self.request("POST", f"/v2/conversations/{conversation_id}/end")

    async def delete_conversation(self, conversation_id: str) -> None:
        await self.request("DELETE", f"/v2/conversations/{conversation_id}")


def _app_message_error(status: int, message: str) -> type[TavusError]:
    """What a send-app-message failure means for delivery (Tavus's documented answers)."""
    lowered = message.lower()
    if status in (409, 410) or (
        status in (400, 404)
        and ("active conversation" in lowered or "no longer available" in lowered)
    ):
        return TavusConversationEnded
    if status == 413:
        return TavusPayloadTooLarge
    if status in (502, 503):
        return TavusNotDelivered
    if status >= 500:
        return TavusDeliveryUncertain
    return _error_class(status)


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TavusError(f"unexpected response: expected a JSON object, got {type(body).__name__}")
    return body


def _items(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        return [i for i in body if isinstance(i, dict)]
    if isinstance(body, dict):
        for key in ("data", "personas", "conversations", "items"):
            value = body.get(key)
            if isinstance(value, list):
                return [i for i in value if isinstance(i, dict)]
    return []
