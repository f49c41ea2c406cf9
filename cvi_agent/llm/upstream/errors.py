"""What every upstream transport raises, so the brain handles one set of failures whichever
client carried the request."""

from __future__ import annotations

import json


class UpstreamHTTPError(Exception):
    """The upstream answered with a non-2xx status; `message` is safe to log."""

    def __init__(self, status: int, message: str) -> None:
        """`status` as the upstream answered; `message` from its error body, already trimmed."""
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class UpstreamConnectionError(Exception):
    """The upstream could not be reached, or the connection broke mid-answer."""


class UpstreamTimeout(UpstreamConnectionError):
    """Connecting or waiting for the next bytes took longer than its timeout."""


def error_message(body: bytes) -> str:
    """The message of an error answer, short enough to log: OpenAI's `error.message` shape
    first, a bare `message` next, else the start of the body."""
    try:
        payload = json.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(payload, dict) and payload.get("message"):
            return str(payload["message"])[:300]
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:300].decode(errors="replace") or "no body"
