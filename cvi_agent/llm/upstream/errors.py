"""What every upstream transport raises, so the brain handles one set of failures whichever
client carried the request."""

from __future__ import annotations

import json
import re
import socket


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


class UpstreamDeadline(Exception):
    """The reply's time ran out with its stream still open (`ChatStream.expire_at`): not a
    failure of the connection, the end of the reply. The message says what the upstream was
    doing meanwhile: sending, silent, or waiting for us to read."""


# What an upstream may echo back of the key it was sent ("Incorrect API key provided: sk-…").
_KEY_SHAPED = re.compile(r"\b(?:sk|pk|rk)[-_][A-Za-z0-9_\-*.]{4,}")
_KEY_ECHOED = re.compile(r"(?i)(api[ _-]?key(?: provided)?\s*[:=]\s*)[^\s,;]+")


def mask_keys(text: str) -> str:
    """`text` with anything shaped like an API key replaced by `***`, on one line."""
    text = _KEY_SHAPED.sub("***", text)
    text = _KEY_ECHOED.sub(r"\1***", text)
    return " ".join(text.split())


def error_message(body: bytes) -> str:
    """The message of an error answer, short enough to log and with any key it echoes masked:
    OpenAI's `error.message` shape first, a bare `message` next, else the start of the body."""
    try:
        payload = json.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return mask_keys(str(error["message"])[:300])
        if isinstance(payload, dict) and payload.get("message"):
            return mask_keys(str(payload["message"])[:300])
    except (ValueError, UnicodeDecodeError):
        pass
    return mask_keys(body[:300].decode(errors="replace")) or "no body"


def connect_failure(exc: OSError, host: str, port: int | None) -> str:
    """Why connecting to `host:port` failed, in a few words a person acts on."""
    if isinstance(exc, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(exc, socket.gaierror):
        why = "cannot resolve the host name"
    elif isinstance(exc, TimeoutError):
        why = "timed out"
    elif isinstance(exc, ConnectionResetError):
        why = "connection reset"
    else:
        why = str(exc.strerror or exc).lower()
        if "refused" in why or "connect call failed" in why:
            why = "connection refused"
    return f"could not connect to {host}:{port}: {why}"
