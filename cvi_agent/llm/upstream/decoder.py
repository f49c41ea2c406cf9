"""Incremental decoding of the upstream's Server-Sent Events into JSON values.

Transports hand over body bytes as they arrive; this turns them into the `data:` events of an
OpenAI-compatible stream without caring which client read them.

Bounded: a line, or an event, longer than `MAX_EVENT_BYTES` fails the stream (an upstream that
sends one line with no end would otherwise grow the buffer, and its memory, without limit), and
each byte is searched for a line end once: the start of a line waits in a buffer of its own
while only the newly arrived bytes are searched.
"""

from __future__ import annotations

import json
import json.scanner
from collections import deque
from typing import Any

from cvi_agent.llm.upstream.errors import UpstreamConnectionError

# 1 MiB: far above any chunk an OpenAI-compatible upstream sends (a few hundred bytes; a large
# tool-call fragment a few KiB), small enough that a broken upstream costs little.
MAX_EVENT_BYTES = 1 << 20

_loads = json.loads
# The C scanner straight away: `json.loads` on bytes runs a pure-Python encoding detection and
# two wrapper calls per event, which profiling showed at ~1/3 of the per-chunk decode cost.
_scan: Any = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


class SSEDecoder:
    """Bytes in, one JSON value per `data:` event out.

    Only `data:` fields matter on this wire; `[DONE]` ends the stream. An event that is not
    JSON, or a line or event longer than `MAX_EVENT_BYTES`, becomes an `UpstreamConnectionError`
    in the output, in its place, so the reader raises it after the events before it; past a
    line or event too long, nothing more is decoded.
    """

    __slots__ = ("_data", "_partial", "_size", "done", "failed")

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of a line whose end has not arrived yet
        self._data: list[bytes] = []  # the data lines of the event under way
        self._size = 0  # the bytes in `_data`, counted once it has a second line
        self.done = False
        self.failed = False

    def feed(self, chunk: bytes, out: deque[Any]) -> None:
        """Decode `chunk` (any slice of the body), appending each complete event to `out`."""
        if self.failed:
            return
        start = 0
        find = chunk.find
        if self._partial:
            # The line under way goes on: only the new bytes are searched for its end.
            end = find(b"\n")
            partial = self._partial
            if len(partial) + (len(chunk) if end < 0 else end) > MAX_EVENT_BYTES:
                self._fail("a line", out)
                return
            if end < 0:
                partial += chunk
                return
            partial += memoryview(chunk)[:end]
            line = bytes(partial)
            partial.clear()
            start = end + 1
            if not self._line(line, out):
                return
        data = self._data
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            if end - start > MAX_EVENT_BYTES:
                self._fail("a line", out)
                return
            line = chunk[start:end]
            start = end + 1
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    self._dispatch(out)
            elif line[:5] == b"data:":
                value = line[6:] if line[5:6] == b" " else line[5:]
                if data and not self._grow(len(value), out):
                    return
                data.append(value)
        if start < len(chunk):
            if len(chunk) - start > MAX_EVENT_BYTES:
                self._fail("a line", out)
                return
            self._partial += memoryview(chunk)[start:]

    def flush(self, out: deque[Any]) -> None:
        """The end of the body ends a last event that had no blank line after it."""
        if self._partial:
            self.feed(b"\n", out)
        if not self.failed:
            self._dispatch(out)

    def _line(self, line: bytes, out: deque[Any]) -> bool:
        """One whole line that was buffered (the slow path of `feed`); False once failed."""
        if line[-1:] == b"\r":
            line = line[:-1]
        if not line:
            self._dispatch(out)
        elif line[:5] == b"data:":
            value = line[6:] if line[5:6] == b" " else line[5:]
            if self._data and not self._grow(len(value), out):
                return False
            self._data.append(value)
        return True

    def _grow(self, size: int, out: deque[Any]) -> bool:
        """Count a further data line of one event; False (and failed) past the cap."""
        total = (self._size or len(self._data[0])) + size
        if total > MAX_EVENT_BYTES:
            self._fail("an event", out)
            return False
        self._size = total
        return True

    def _fail(self, what: str, out: deque[Any]) -> None:
        self.failed = True
        self._partial = bytearray()
        self._data.clear()
        out.append(UpstreamConnectionError(f"upstream sent {what} longer than 1 MiB"))

    def _dispatch(self, out: deque[Any]) -> None:
        data = self._data
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        if self._size:
            self._size = 0
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            text = payload.decode()
            value, end = _scan(text, 0)
            if end != len(text):
                value = _loads(text)  # trailing whitespace, or garbage (raises)
            out.append(value)
        except (ValueError, StopIteration, RecursionError):
            out.append(UpstreamConnectionError("upstream sent an event that is not JSON"))
