"""`x-request-id` on every HTTP response: the caller's own when it sent a usable one, else ours.

The OpenAI SDKs expose it (`response._request_id` in Python, `request_id` in Node), so a
caller can quote it and we can find the request in our log: `RequestIdFormatter` appends the
id to every log line written while the request is handled (the turn's generation task inherits
it too). Plain ASGI, in front of everything else but Starlette's `ServerErrorMiddleware`
(whose 500 handler reads the id from the scope): per request one header scan, one random
number and one context variable; per response message one plain function call.

It also writes the request log (`web/access.py`): it puts the request's `RequestFacts` in the
scope, notes the status from the response's start, and logs one line when the response ended
— no work per streamed chunk beyond the same function call, none at all for the line when the
access logger is disabled.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cvi_agent.web.access import FACTS_SCOPE_KEY, RequestFacts, log_request
from cvi_agent.web.access import log as access_log

HEADER = b"x-request-id"
#: Where the request's id sits in the ASGI scope, for code that has the scope but not our send.
REQUEST_ID_SCOPE_KEY = "cvi.request_id"
MAX_LENGTH = 128
# What we echo back as is: bounded, and nothing a log line or a header could be forged with.
_SAFE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,%d}" % MAX_LENGTH)

_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})
#: Messages that set the status of the request's log line (an accepted websocket is a 101).
_STATUS = _STARTS | {"websocket.accept"}

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cvi_request_id", default=None
)


def current_request_id() -> str | None:
    """The id of the request being handled in this context (None outside a request)."""
    return _current.get()


def new_request_id() -> str:
    """A fresh id in OpenAI's style (`req_` and 24 hex digits); unique enough to find a line
    in a log, not a secret (`random`, not `secrets`: it is on the hot path)."""
    return f"req_{random.getrandbits(96):024x}"


class RequestId:
    """ASGI middleware: pick the request's id, put it in the scope and the logging context,
    add `x-request-id` to the response's headers, and log the request's line at its end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        raw: bytes | None = None
        for name, value in scope["headers"]:
            if name == HEADER:
                raw = value
                break
        if raw is not None and _SAFE.fullmatch(raw) is not None:
            request_id = raw.decode("ascii")
            header = (HEADER, raw)
        else:
            request_id = new_request_id()
            header = (HEADER, request_id.encode("ascii"))
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        facts = scope[FACTS_SCOPE_KEY] = RequestFacts()
        started = time.perf_counter()

        def send_with_id(message: Message) -> Awaitable[None]:
            # Not a coroutine of its own: the caller awaits `send`'s directly, so every body
            # message (a streamed chunk) costs one plain call here, not one more coroutine.
            # (A refused websocket handshake is an HTTP response too.)
            kind = message["type"]
            if kind in _STATUS:
                if kind in _STARTS:
                    message["headers"] = [*message.get("headers", ()), header]
                    facts.status = message["status"]
                else:
                    facts.status = 101
            return send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if facts.status is None:
                facts.status = 500  # Starlette's outermost handler answers it
            raise
        finally:
            _current.reset(token)
            if access_log.isEnabledFor(logging.INFO) or (facts.status or 0) >= 500:
                log_request(scope, facts, started, request_id)


class RequestIdFormatter(logging.Formatter):
    """A formatter that ends each line written during a request with ` request_id=…`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None) or _current.get()
        return f"{line} request_id={request_id}" if request_id else line
