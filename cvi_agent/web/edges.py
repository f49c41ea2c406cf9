"""The server's HTTP edges: which uvicorn protocol serves a connection, and a websocket protocol
that refuses a handshake quietly. `cvi-agent serve` passes both to uvicorn (`SERVER_PROTOCOLS`);
with uvicorn's own command line: `--http cvi_agent.web.edges:HTTPProtocol --ws
cvi_agent.web.edges:WebSocketProtocol`.

**Which parser.** httptools (C, llhttp) serves every ordinary connection: it is uvicorn's fastest
and the hot path stays on it. Two kinds of request it gets wrong on the wire, as of uvicorn 0.54
and httptools 0.9, so the connections that start with one go to uvicorn's h11 implementation:

- *HTTP/1.0*: uvicorn's httptools protocol frames a response without a length with
  `Transfer-Encoding: chunked` whatever the request's version, and HTTP/1.0 has no chunked
  coding (a 1.0 client shows the chunk sizes as content). h11 ends such a body by closing the
  connection, as HTTP/1.0 expects.
- *an upgrade offer other than websocket* (`Connection: Upgrade` + `Upgrade: h2c`, what `curl
  --http2` sends on `http://`): httptools tells llhttp that an upgrade request has no body, so
  the body is dropped (the route answers 400) and the connection is unusable afterwards. h11
  reads the body, and the offer is simply declined (RFC 9110 §7.8: the response is plain
  HTTP/1.1), logged at DEBUG, not as uvicorn's WARNING per request.

The choice is made once per connection, from the first request's head (request line and
headers): a connection is handed to one protocol for its life, as uvicorn's own HTTP/2 sniffer
does. Only the first request is examined: a 1.0 connection closes after its first response, and
clients offer an upgrade on the first request only. The head is held until it is complete (a
server cannot act on a request before then anyway), at most `MAX_HEAD` bytes; a longer one goes
to httptools, which answers it as before.

**Quiet refusals.** uvicorn's default websocket implementation (websockets-sansio) never marks
the handshake complete after a denial response (the `websocket.http.response` extension, which
`web/security.deny_websocket` uses to refuse with a JSON error and the right status), so every
refused handshake is followed by `ERROR: ASGI callable returned without completing handshake.`
`WebSocketProtocol` marks it complete once the denial is sent (uvicorn's wsproto implementation
already does; upstream pull request Kludex/uvicorn#3138 makes the same change).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from cvi_agent import metrics
from cvi_agent.web.connections import (
    HEADERS,
    GuardedHttpToolsProtocol,
    env_limits,
    timeout_response,
)

#: A first request head longer than this is not examined (h11's default limit for a head).
MAX_HEAD = 16 * 1024


def needs_h11(head: bytes) -> bool:
    """Whether a connection whose first request head is `head` (request line and headers,
    without the blank line) must be served by h11 (see the module docstring)."""
    request_line, _, headers = head.partition(b"\r\n")
    if request_line.rstrip().endswith(b"HTTP/1.0"):
        return True
    if b"upgrade" not in headers.lower():
        return False
    upgrade: bytes | None = None
    connection_upgrade = False
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"upgrade":
            upgrade = value.strip().lower()
        elif name == b"connection":
            connection_upgrade |= b"upgrade" in (t.strip().lower() for t in value.split(b","))
    return connection_upgrade and upgrade is not None and upgrade != b"websocket"


class QuietH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, declining an upgrade offer other than websocket at DEBUG instead
    of a WARNING per request: a server may ignore `Upgrade` (RFC 9110 §7.8), and every `curl
    --http2` on `http://` offers one."""

    def _unsupported_upgrade_warning(self) -> None:
        self.logger.debug("Declined an upgrade offer: served as HTTP/1.1.")


class HTTPProtocol(asyncio.Protocol):
    """Reads a connection's first request head, then hands the connection to `fast` (our
    httptools protocol with deadlines and the connection cap, `web/connections.py`) or to
    `careful` (`needs_h11`). While the head is read, the header deadline applies here: a
    connection whose first head is not complete in time is closed and counted, like one the
    fast protocol closes.

    Args:
        config: uvicorn's configuration (the protocol it hands over to reads it too).
        server_state: uvicorn's server state; the connection is in its `connections` while its
            head is read, so a shutdown closes it.
        app_state: the lifespan state every request's scope copies.
        _loop: the event loop (uvicorn passes it by this name).
    """

    fast: ClassVar[type[asyncio.Protocol]] = GuardedHttpToolsProtocol
    careful: ClassVar[type[asyncio.Protocol]] = QuietH11Protocol

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.limits = getattr(config, "connection_limits", None) or env_limits()
        self.header_timeout = self.limits.header_timeout
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        if self.header_timeout > 0:
            self._timer = self.loop.call_later(self.header_timeout, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._disarm()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        """The first head did not arrive in time: 408 when the client sent part of it, then
        close (a connection that sent nothing is just closed), as the fast protocol does."""
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        metrics.slow_client(HEADERS)
        if self.buffer:
            self.transport.write(timeout_response(self.limits, HEADERS))
        self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's shutdown: nothing was served on this connection yet."""
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        start = max(0, len(self.buffer) - 3)
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self.buffer) <= MAX_HEAD:
                return
            self._hand_over(self.fast)
            return
        head = bytes(self.buffer[:end])
        self._hand_over(self.careful if needs_h11(head) else self.fast)

    def _hand_over(self, protocol_class: type[asyncio.Protocol]) -> None:
        assert self.transport is not None
        self._disarm()
        self.server_state.connections.discard(self)
        protocol = protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(bytes(self.buffer))
        self.buffer = bytearray()


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with the handshake marked complete once a denial
    response has been sent (so a refusal is not reported as an ERROR)."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True


#: Keyword arguments for `uvicorn.run` / `uvicorn.Config`.
SERVER_PROTOCOLS: dict[str, Any] = {"http": HTTPProtocol, "ws": WebSocketProtocol}
