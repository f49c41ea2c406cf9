"""API keys: the one check every router and the live feed use.

Keys come as `Authorization: Bearer K` or `x-api-key: K` and are compared in constant time
against every accepted key. `require_key` is the FastAPI dependency; routers that count
refusals (the chat routes' metrics) build theirs with `key_dependency(on_refused=...)`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from cvi_agent.web.errors import ApiError


def constant_time_in(candidate: str, accepted: tuple[str, ...]) -> bool:
    """Whether `candidate` is one of `accepted`, comparing every key in constant time."""
    found = False
    given = candidate.encode()
    for key in accepted:
        found |= hmac.compare_digest(given, key.encode())
    return found


def presented_key(request_headers: Any) -> str | None:
    """The API key from `Authorization: Bearer K` or `x-api-key: K`."""
    auth = request_headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    key = request_headers.get("x-api-key")
    return str(key).strip() if key else None


def check_api_key(request_headers: Any, accepted: tuple[str, ...]) -> None:
    key = presented_key(request_headers)
    if not key:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not constant_time_in(key, accepted):
        raise ApiError(
            401, "Invalid API key.", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def key_dependency(
    on_refused: Callable[[ApiError], None] | None = None,
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that accepts a request only with one of the app's API keys.

    The keys are the app's `Settings.api_keys` (`request.app.state.settings`). It is async on
    purpose: FastAPI runs sync dependencies in a thread pool (a thread hop per request).
    `on_refused` sees each refusal before it is raised (the chat routes count it).
    """

    async def require(request: Request) -> None:
        try:
            check_api_key(request.headers, request.app.state.settings.api_keys)
        except ApiError as exc:
            if on_refused is not None:
                on_refused(exc)
            raise

    return require


require_key = key_dependency()
