"""HTTP plumbing shared by every router: the OpenAI error shape, auth, bounded body reading."""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvi_agent.protocol.chat import error_payload

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered in the OpenAI shape `{"error": {message, type, code, param}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or _STATUS_TYPES.get(status, "api_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_payload(self.message, self.type, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return ApiError(status, message, code, param).response()


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


CONVERSATION_HEADERS = ("conversation_id", "conversation-id", "x-conversation-id")


def conversation_id_from(request_headers: Any) -> str | None:
    """The conversation id Tavus sends as a header; its spelling is undocumented (any case)."""
    for name in CONVERSATION_HEADERS:
        value = request_headers.get(name)
        if value:
            value = str(value).strip()
            if value and len(value) <= 256:
                return value
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(
                400, "Invalid Content-Length header.", "invalid_content_length"
            ) from None
        if size > limit:
            raise ApiError(413, f"Request body too large (limit {limit} bytes).", "body_too_large")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"Request body too large (limit {limit} bytes).", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "Request body is empty; expected a JSON object.", "invalid_json")
    try:
        # Strict UTF-8 (json.loads(bytes) would let UTF-8-encoded surrogates through).
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "Request body is not valid UTF-8.", "invalid_json") from None
    if "\\u0000" in text:  # JSON can only carry NUL escaped; PostgreSQL cannot store it
        text = _ESCAPED_NUL.sub(r"\1", text)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NonFinite:
        raise ApiError(
            400,
            "Request body has a number JSON cannot carry (NaN, Infinity or out of range).",
            "invalid_json",
        ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"Request body is not valid JSON: {exc.msg} at position {exc.pos}.", "invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "Request body is nested too deeply.", "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "Request body must be a JSON object.", "invalid_json")
    if ("\\ud" in text or "\\uD" in text) and _lone_surrogate(value):
        # `"\ud800"` parses to a string no UTF-8 encoder (our responses, the database) accepts.
        raise ApiError(
            400,
            "Request body is not valid Unicode: it escapes an unpaired UTF-16 surrogate.",
            "invalid_json",
        )
    return value


# `\u0000` preceded by an even number of backslashes (so an escaped backslash followed by
# "u0000" is left alone); the group keeps those backslashes.
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


class _NonFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON does not, and PostgreSQL refuses to store them.
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _NonFinite(text)
    return value


def _lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def is_json_media_type(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, whatever its Content-Type says when it is valid JSON (the
    OpenAI SDK and Tavus send application/json; refusing a valid body would only break a
    call). A body that is not JSON and declares another media type gets 415, else 400."""
    body = await read_body(request, limit)
    try:
        return parse_json_object(body)
    except ApiError as exc:
        declared = request.headers.get("content-type")
        if exc.status == 400 and declared and not is_json_media_type(declared):
            media = declared.partition(";")[0].strip()[:100]
            raise ApiError(
                415,
                f"Unsupported Content-Type {media!r}: send a JSON object as application/json.",
                "unsupported_media_type",
            ) from None
        raise


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A short human message and the offending parameter from pydantic errors."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route for {request.method} {request.url.path}."
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(
            exc.status_code, message, code, headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return ApiError(400, message, "invalid_request", param).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The route's template, never the concrete path: a path can carry a secret (the
        # Argil callback token sits in `/callbacks/argil/{token}`).
        route = request.scope.get("route")
        where = getattr(route, "path", None) or "an unmatched route"
        log.exception("unhandled error on %s %s", request.method, where)
        return ApiError(
            500, "Internal server error.", "internal_error", type_="api_error"
        ).response()
