"""Connection deadlines and the connection cap, in uvicorn's HTTP protocol itself.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and nothing else: a client
that sends its request headers a byte a second, or declares a body and never sends it, holds
its connection (and, for a body, a task) for as long as it likes, and no API key is needed for
the first. ASGI middleware cannot help with headers: the app only hears of a request once they
are complete. So `GuardedHttpToolsProtocol` extends uvicorn's httptools protocol with:

- a **header deadline** (`CVI_HEADER_TIMEOUT`): from a new connection, or from the first byte
  of a request, its headers must be complete within it, else 408 and close (a connection that
  sent nothing is just closed);
- a **body deadline** (`CVI_BODY_TIMEOUT`): from the end of the headers, the declared body
  must be complete within it, else 408 (when nothing was answered yet) and close; the app's
  pending `receive()` gets `http.disconnect`, so the route that waits for the body ends;
- a **connection cap** (`CVI_MAX_CONNECTIONS`): a request on a connection beyond it, or
  beyond as many requests in flight, is answered 503 in the OpenAI error shape with
  `Retry-After` (uvicorn's own `limit_concurrency` answers plain text, counting the current
  connection against the limit).

Cost on the hot path: the deadline is one `call_at` timer per connection, armed when the
connection is made, and re-armed only when a `data_received` ends with a request's headers or
body still incomplete. A request that arrives whole (the common case: headers and a small body
in one segment) arms and cancels nothing. Every refusal is counted in
`cvi_slow_clients_closed` / `cvi_connections_refused` (metrics.py).

Websocket upgrades leave this protocol at the handshake (uvicorn hands the transport to its
websocket protocol), taking their timer with them.

One more thing uvicorn leaves to asyncio: a response written on after its client went away.
The first failed write closes the transport, but uvicorn's response only learns of it when the
loop runs the connection's `connection_lost`; a streamed reply pushed several chunks in one
step of the loop (llm/turns.py) kept writing, and asyncio logged `socket.send() raised
exception.` for every write from the fifth on. Each response writes through
`ResponseTransport`, which drops a write once the transport is closing (one method call per
write).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from cvi_agent import metrics
from cvi_agent.config import Settings
from cvi_agent.protocol.chat import error_payload

HEADERS = "headers"
BODY = "body"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-process limits on connections (0 turns one off).

    Args:
        header_timeout: seconds a request's headers may take, from the connection or from the
            request's first byte.
        body_timeout: seconds a declared body may take, from the end of its headers.
        max_connections: open connections served at once (and requests in flight); a request
            beyond it gets 503.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000


def limits_of(settings: Settings) -> ConnectionLimits:
    """The limits `CVI_HEADER_TIMEOUT`, `CVI_BODY_TIMEOUT` and `CVI_MAX_CONNECTIONS` set."""
    return ConnectionLimits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections,
    )


@functools.cache
def env_limits() -> ConnectionLimits:
    """The limits of the environment, read once per process: what a `--workers` process uses
    (uvicorn builds a plain `Config` there)."""
    return limits_of(Settings())


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    return json.dumps(error_payload(message, kind, code, None)).encode()


_BUSY_BODY = _error_body(
    503,
    "The server is at its connection limit (CVI_MAX_CONNECTIONS); retry shortly.",
    "too_many_connections",
)


def timeout_response(limits: ConnectionLimits, phase: str) -> bytes:
    """The 408 a client gets when its request `phase` (HEADERS or BODY) missed its deadline."""
    timeout = limits.header_timeout if phase == HEADERS else limits.body_timeout
    setting = "CVI_HEADER_TIMEOUT" if phase == HEADERS else "CVI_BODY_TIMEOUT"
    body = _error_body(
        408,
        f"The request {phase} did not arrive within {timeout:g} s ({setting}).",
        "request_timeout",
    )
    return b"".join(
        (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n",
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        )
    )


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The app that answers a request beyond the connection cap."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(_BUSY_BODY)),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY_BODY})


class ResponseTransport:
    """The connection's transport as one response sees it.

    - The response head (the first write) is held until the end of the event loop's current
      turn, and goes out in one write with the body when that comes in the same turn, as it
      does for a JSON answer and for a stream's first chunk (uvicorn writes the head on
      `http.response.start`, the body on the next message: two system calls and two TCP
      segments per response otherwise). Every later write goes through at once; a head with no
      body yet goes out at the end of the turn, never later.
    - A write once the transport is closing (the client went away and asyncio noticed on an
      earlier write, or we closed it) is dropped here, quietly, instead of being counted and
      logged by asyncio (`socket.send() raised exception.`).

    Everything else is the transport's own.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = loop  # None once the head was written
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            loop = self._loop
            if loop is not None:  # the head: held for the rest of this turn
                self._loop = None
                self._held = data
                loop.call_soon(self.flush)
                return
            if not self._transport.is_closing():
                self._transport.write(data)
            return
        self._held = None
        if not self._transport.is_closing():
            self._transport.write(held + data)

    def flush(self) -> None:
        """Write the head if it is still held."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines and a connection cap (see
    the module docstring). Reads its `ConnectionLimits` from `config.connection_limits`
    (`cvi_agent.web.server.ServerConfig`), else from the environment (`env_limits`)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "connection_limits", None) or env_limits()
        self._served_app = self.app
        self._phase: str | None = None  # what we wait for: HEADERS, BODY, or nothing
        self._phase_since = 0.0
        self._request_bytes = False  # whether any byte of the awaited request arrived
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase: str | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter(HEADERS)
        self._request_bytes = False
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            self._disarm()  # upgraded to a websocket, or refused by the parser
        elif self._phase is None:
            if self._timer is not None:
                self._disarm()
        elif self._timer_phase != self._phase:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- httptools parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._enter(HEADERS)
        self._request_bytes = True

    def on_headers_complete(self) -> None:
        previous = self.cycle
        cap = self.limits.max_connections
        upgrade = self.parser.should_upgrade() and self._should_upgrade()  # not ours to refuse
        if cap and not upgrade and (len(self.connections) > cap or len(self.tasks) >= cap):
            metrics.connection_refused("too_many_connections")
            self.app = _busy  # read once below, for this request only
            try:
                super().on_headers_complete()
            finally:
                self.app = self._served_app
        else:
            super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:  # a new request (not an upgrade)
            cycle.transport = ResponseTransport(self.transport, self.loop)  # type: ignore[assignment]
        self._enter(BODY)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = None

    # -- deadlines ------------------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        self._phase = phase
        self._phase_since = self.loop.time()

    def _arm(self) -> None:
        self._disarm()
        phase = self._phase
        timeout = self.limits.header_timeout if phase == HEADERS else self.limits.body_timeout
        if phase is None or timeout <= 0:
            return
        self._timer = self.loop.call_at(self._phase_since + timeout, self._expired, phase)
        self._timer_phase = phase

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_phase = None

    def _expired(self, phase: str) -> None:
        self._timer = None
        self._timer_phase = None
        if self.transport.is_closing() or phase != self._phase:
            return
        metrics.slow_client(phase)
        self.logger.info("closed a connection whose request %s did not arrive in time", phase)
        cycle = self.cycle
        # A 408 only where the client expects the next response: not while an earlier
        # (pipelined) request's response is still being written.
        idle = not self.pipeline and (cycle is None or cycle.response_complete)
        if phase == BODY and cycle is not None and not cycle.response_complete:
            started = cycle.response_started
            cycle.disconnected = True  # the app's receive() says http.disconnect, send() no-ops
            cycle.message_event.set()
            if not started and not self.pipeline:
                self.transport.write(self._timeout_response(phase))
        elif phase == HEADERS and self._request_bytes and idle:
            self.transport.write(self._timeout_response(phase))
        self.transport.close()

    def _timeout_response(self, phase: str) -> bytes:
        return timeout_response(self.limits, phase)
