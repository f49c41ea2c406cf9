"""Incremental decoding of the upstream's Server-Sent Events into JSON values.

Transports hand over body bytes as they arrive; this turns them into the `data:` events of an
OpenAI-compatible stream without caring which client read them.
"""

from __future__ import annotations

import json
import json.scanner
from collections import deque
from typing import Any

from cvi_agent.llm.upstream.errors import UpstreamConnectionError

_loads = json.loads
# The C scanner straight away: `json.loads` on bytes runs a pure-Python encoding detection and
# two wrapper calls per event, which profiling showed at ~1/3 of the per-chunk decode cost.
_scan: Any = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


class SSEDecoder:
    """Bytes in, one JSON value per `data:` event out.

    Only `data:` fields matter on this wire; `[DONE]` ends the stream. An event that is not
    JSON becomes an `UpstreamConnectionError` in the output, in its place, so the reader
    raises it after the events before it.
    """

    __slots__ = ("_buf", "_data", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self.done = False

    def feed(self, chunk: bytes, out: deque[Any]) -> None:
        """Decode `chunk` (any slice of the body), appending each complete event to `out`."""
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        find = buf.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                self._dispatch(out)
            elif line[:5] == b"data:":
                self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        self._buf = buf[start:]

    def flush(self, out: deque[Any]) -> None:
        """The end of the body ends a last event that had no blank line after it."""
        if self._buf:
            self.feed(b"\n", out)
        self._dispatch(out)

    def _dispatch(self, out: deque[Any]) -> None:
        data = self._data
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        self._data = []
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            text = payload.decode()
            value, end = _scan(text, 0)
            if end != len(text):
                value = _loads(text)  # trailing whitespace, or garbage (raises)
            out.append(value)
        except (ValueError, StopIteration):
            out.append(UpstreamConnectionError("upstream sent an event that is not JSON"))
