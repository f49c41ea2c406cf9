"""Request bodies: bounded reading and strict JSON-object parsing (a bad body is a 4xx)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from cvi_agent.store.base import MAX_JSON_DEPTH, too_deep
from cvi_agent.web.errors import ApiError


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
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(
                    413, f"Request body too large (limit {limit} bytes).", "body_too_large"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left mid-body, or missed CVI_BODY_TIMEOUT (web/connections.py closed it):
        # nobody reads this answer, but it ends the route quietly instead of as a 500.
        raise ApiError(408, "The request body did not arrive.", "body_incomplete") from None
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """`body` as a JSON object we can store and serve back, else `ApiError(400, invalid_json)`.

    Every error the parser can raise is a 400, not only `JSONDecodeError`: an integer literal
    past Python's int-string limit (4300 digits) is a plain `ValueError`, a deep array a
    `RecursionError`. Beyond that: no NaN/Infinity or out-of-range floats, no unpaired
    surrogates, at most `MAX_JSON_DEPTH` levels.
    """
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
        raise ApiError(400, _TOO_DEEP, "invalid_json") from None
    except (ValueError, OverflowError):
        # int("1" * 5000) refuses past sys.get_int_max_str_digits(); nothing else is expected,
        # but whatever the parser raises is the body's fault, never a 500.
        raise ApiError(
            400, "Request body has a number too long to use (over 4300 digits).", "invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(400, "Request body must be a JSON object.", "invalid_json")
    if _too_deep(value, text):
        raise ApiError(400, _TOO_DEEP, "invalid_json")
    if ("\\ud" in text or "\\uD" in text) and _lone_surrogate(value):
        # `"\ud800"` parses to a string no UTF-8 encoder (our responses, the database) accepts.
        raise ApiError(
            400,
            "Request body is not valid Unicode: it escapes an unpaired UTF-16 surrogate.",
            "invalid_json",
        )
    return value


_TOO_DEEP = f"Request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)."


def _too_deep(value: dict[str, Any], text: str) -> bool:
    """Whether `value` nests deeper than `MAX_JSON_DEPTH`. A body with fewer brackets than the
    limit cannot (two C-speed counts, the common case); else one walk over its containers."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    return too_deep(value)


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
