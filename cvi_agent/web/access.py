"""The request log: one line per HTTP request (and websocket session), at INFO, on the
`cvi_agent.access` logger; it replaces uvicorn's access log.

A line says: method, the route's template (`/v1/conversations/{conversation_id}`, never the
query string; the raw path only when no route matched, and the redaction filter masks what a
raw path may carry), status, duration, and what the handlers learned on the way, which they
leave in the request's `RequestFacts` (in the ASGI scope under `FACTS_SCOPE_KEY`): the persona,
the conversation id, the turn's time to first token and fallback (the chat route), which API key
was used (its last 4 characters, never the key) and why a request was refused (401, 403, 429:
the error's code). The request id is the record's `request_id` attribute, which both formats
print (`web/logs.py`: text by default, JSON lines with `CVI_LOG_FORMAT=json`).

Cost: the middleware that calls `log_request` (`web/request_id.RequestId`, already in front of
everything) does nothing per streamed chunk; per request it stores one object in the scope and,
at the end, builds one record — nothing at all when the logger is disabled below INFO. A line
for a matched route is made of parts that cannot hold a secret (the template, numbers, names
from the configuration, codes, 4 characters of a key) and the conversation id, which is masked
here with the shape rules; it is marked clean, so the redaction filter, whose scan of a whole
line costs about 30 µs, skips it. A raw path (no route matched) goes through the filter.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Scope

from cvi_agent.protocol.redact import redact_text

#: Where a request's facts sit in the ASGI scope.
FACTS_SCOPE_KEY = "cvi.facts"
#: The record attribute that tells the redaction filter (web/logs.py) a record is clean already.
REDACTED_MARK = "_cvi_redacted"
MAX_PATH = 200

log = logging.getLogger("cvi_agent.access")


class RequestFacts:
    """What the handlers of one request learned, for its log line (every field optional).

    Attributes:
        status: the response's status (set by the middleware; None: no response was sent).
        persona: the persona (the chat route's `model`).
        conversation_id: the Tavus conversation id of a chat turn.
        turn_state: the turn's `ctx.state`, read once at the end for `ttft` (seconds to the
            first token) and `fallback` (`(code, mode, mid_reply)`, `llm/failure.py`).
        key_tail: the last 4 characters of the API key the request was admitted with.
        reason: why the request was refused (the error's code, e.g. `invalid_api_key`).
    """

    __slots__ = ("conversation_id", "key_tail", "persona", "reason", "status", "turn_state")

    def __init__(self) -> None:
        self.status: int | None = None
        self.persona: str | None = None
        self.conversation_id: str | None = None
        self.turn_state: dict[str, Any] | None = None
        self.key_tail: str | None = None
        self.reason: str | None = None


def facts_of(scope: Scope) -> RequestFacts | None:
    """The request's facts (None outside the middleware, e.g. a bare test app)."""
    facts: RequestFacts | None = scope.get(FACTS_SCOPE_KEY)
    return facts


def key_tail(key: str) -> str:
    """How a key is named in the log: `…` and its last 4 characters (nothing of a short key)."""
    return "…" + key[-4:] if len(key) >= 12 else "…"


def _template(scope: Scope) -> str | None:
    template = getattr(scope.get("route"), "path", None)
    return template if isinstance(template, str) else None


def _route(scope: Scope) -> str:
    template = _template(scope)
    if template is not None:
        return template
    path: str = scope.get("path", "")
    if len(path) > MAX_PATH:
        path = path[:MAX_PATH] + "…"
    if not path.isprintable():  # a %0A in the URL must not start a forged log line
        path = path.encode("unicode_escape").decode("ascii")
    return path


def request_fields(scope: Scope, facts: RequestFacts, started: float) -> dict[str, Any]:
    """The fields of one request's line, in order (None: not known for this request)."""
    fields: dict[str, Any] = {
        "method": scope.get("method") or "WEBSOCKET",
        "route": _route(scope),
        "status": facts.status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if facts.persona is not None:
        fields["persona"] = facts.persona
    if facts.conversation_id is not None:
        fields["conversation_id"] = redact_text(facts.conversation_id)
    state = facts.turn_state
    if state is not None:
        ttft = state.get("ttft")
        fields["ttft_ms"] = round(ttft * 1000, 1) if ttft is not None else None
        noted = state.get("fallback")  # (code, mode, mid_reply), llm/failure.note
        if isinstance(noted, tuple | list):
            noted = noted[0] if noted else None
        fields["fallback"] = str(noted) if noted else None
    if facts.key_tail is not None:
        fields["key_last4"] = facts.key_tail
    if facts.reason is not None:
        fields["reason"] = facts.reason
    return fields


def _text(fields: dict[str, Any]) -> str:
    head = (
        f"{fields['method']} {fields['route']} {fields['status'] or '-'} {fields['duration_ms']}ms"
    )
    rest = " ".join(
        f"{k}={'-' if v is None else v}"
        for k, v in fields.items()
        if k not in ("method", "route", "status", "duration_ms")
    )
    return f"{head} {rest}" if rest else head


def log_request(scope: Scope, facts: RequestFacts, started: float, request_id: str) -> None:
    """Write the request's line (call it once, when the response has ended)."""
    fields = request_fields(scope, facts, started)
    status = facts.status or 0
    level = logging.WARNING if status >= 500 else logging.INFO
    extra: dict[str, object] = {"request_id": request_id, "fields": fields}
    if _template(scope) is not None:
        # Nothing in it can hold a secret (module docstring): the filter and the JSON
        # formatter skip their scans.
        extra[REDACTED_MARK] = extra["fields_clean"] = True
    log.log(level, _text(fields), extra=extra)
