"""The hand-written upstream transport: asyncio protocols and httptools' C parser.

Why not a general-purpose client here: profiling `cvi-agent bench` showed the `openai` SDK
building a pydantic object per streamed chunk, its request pipeline and httpcore's pool scan
costing over half of the server's CPU per relayed chunk. This transport speaks exactly the
wire the upstream needs (HTTP/1.1, one pre-built request head per upstream) with the C parser
uvicorn already uses, and hands each body chunk over as it arrives.

- One pool of keep-alive connections per upstream, shared by every request.
- Closing a response before its end closes its connection at once: the upstream sees the
  disconnect and stops generating.
- A request on a reused connection that the upstream closed before answering is retried once
  on a new connection (the upstream never saw it).
- A reader that falls behind pauses the socket (backpressure), so a slow client never makes
  the server buffer a whole reply; the read timeout counts only the upstream's silence, never
  the time the socket was paused by us.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

import httptools

from cvi_agent.llm.upstream.base import (
    USER_AGENT,
    UpstreamEndpoint,
    UpstreamResponse,
    UpstreamTransport,
)
from cvi_agent.llm.upstream.errors import (
    UpstreamConnectionError,
    UpstreamTimeout,
    connect_failure,
)
from cvi_agent.llm.upstream.tls import default_ssl_context

_PAUSE_AT = 64  # queued body chunks before we stop reading from the socket (backpressure)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to the upstream; carries one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True
        self.reused = False
        self.idle_since = 0.0
        self.stream: HttptoolsResponse | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.stream is None:  # an idle connection has nothing to say: do not reuse it
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.alive = False
            if self.stream is not None:
                self.stream._fail(UpstreamConnectionError(f"bad HTTP from upstream: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        stream = self.stream
        if stream is not None:
            stream._lost()

    def pause_writing(self) -> None:  # requests are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        stream = self.stream
        if stream is not None:
            stream._headers(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream._body(body)

    def on_message_complete(self) -> None:
        stream = self.stream
        if stream is not None:
            stream._complete(self.parser.should_keep_alive())

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Keep-alive connections to one upstream origin, most recently used first."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        max_idle: int = 512,
        idle_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[_Connection] = []
        self.closed = False

    async def acquire(self) -> _Connection:
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.alive and now - conn.idle_since < self.idle_timeout:
                conn.reused = True
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"could not connect to the upstream within {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamConnectionError(connect_failure(exc, self.host, self.port)) from None
        return conn

    def release(self, conn: _Connection) -> None:
        conn.stream = None
        if self.closed or not conn.alive or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class HttptoolsResponse(UpstreamResponse):
    """One response on one pooled connection: the protocol side queues body chunks, the
    reader side takes them (all that is queued at once)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_finished",
        "_headers_waiter",
        "_keep_alive",
        "_last_read",
        "_lingering",
        "_paused",
        "_pool",
        "_raw_headers",
        "_read_timeout",
        "_request",
        "_waiter",
        "_watchdog",
        "got_bytes",
    )

    def __init__(self, pool: _Pool, request: bytes, read_timeout: float) -> None:
        """Send `request` (head and body, pre-encoded) on a connection of `pool` when started;
        `read_timeout` is the longest silence allowed from the upstream."""
        super().__init__()
        self._pool = pool
        self._request = request
        self._read_timeout = read_timeout
        self._conn: _Connection | None = None
        self._chunks: deque[bytes] = deque()
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._error: BaseException | None = None
        self._finished = False
        self._keep_alive = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._headers_waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._lingering = False
        self.got_bytes = False

    # ------------------------------------------------------------ reader side

    async def start(self) -> None:
        """Send the request and wait for the response headers."""
        for attempt in (1, 2):
            conn = await self._pool.acquire()
            self._attach(conn)
            loop = asyncio.get_running_loop()
            self._headers_waiter = loop.create_future()
            assert conn.transport is not None
            conn.transport.write(self._request)
            try:
                await self._headers_waiter
            except UpstreamConnectionError:
                if attempt == 1 and conn.reused and not self.got_bytes:
                    self._reset()
                    continue
                raise
            finally:
                self._headers_waiter = None
            break
        self.headers = self._raw_headers

    def _attach(self, conn: _Connection) -> None:
        self._conn = conn
        conn.stream = self
        self._last_read = time.monotonic()
        if self._read_timeout and self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self._read_timeout, self._check_idle)

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.stream = None
            conn.close()
        self._error = None
        self.status = 0
        self._raw_headers.clear()
        self.got_bytes = False

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._finished:
                raise StopAsyncIteration
            await self._wait()
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:
            chunk = b"".join(chunks)
            chunks.clear()
        if self._paused:
            self._resume()
        return chunk

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        self._paused = False
        self._last_read = time.monotonic()  # the upstream's silence counts from here again
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.alive:
            conn.transport.resume_reading()

    async def aclose(self, *, done: bool = False) -> None:
        """Back to the pool only when the body ended (`done`) on a keep-alive connection; else
        the connection is closed, so the upstream stops generating."""
        self._close(done)

    def _close(self, done: bool = False) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._finished and self._keep_alive and self._error is None:
            if self._paused and conn.transport is not None and conn.alive:
                self._paused = False
                conn.transport.resume_reading()  # a paused connection is no use to the next
            self._pool.release(conn)
        elif done and not self._finished and self._error is None:
            # `[DONE]` came, the end of the HTTP body not yet: reuse the connection once it
            # does (a new one to a TLS upstream costs a handshake), unless that takes long.
            self._conn = conn
            self._lingering = True
            self._watchdog = asyncio.get_running_loop().call_later(1.0, self._abandon)
            if self._paused:
                self._resume()  # or the end could never arrive
        else:
            conn.stream = None
            conn.close()

    def _abandon(self) -> None:
        self._lingering = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.stream = None
            conn.close()

    # ------------------------------------------------------------ protocol side

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _headers(self, status: int) -> None:
        self.status = status
        self.got_bytes = True
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body(self, body: bytes) -> None:
        self._last_read = time.monotonic()
        if self._lingering:
            return  # the reader is gone; only the end of the body matters now
        chunks = self._chunks
        chunks.append(body)
        if len(chunks) >= _PAUSE_AT and not self._paused:
            conn = self._conn
            if conn is not None and conn.transport is not None:
                self._paused = True
                conn.transport.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self._finished = True
        self._keep_alive = keep_alive
        self._wake()
        if self._lingering:  # closed by its reader after `[DONE]` (see `_close`): free now
            self._lingering = False
            self._close()

    def _fail(self, error: BaseException) -> None:
        if self._lingering:
            self._abandon()
            return
        if self._error is None and not self._finished:
            self._error = error
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()

    def _lost(self) -> None:
        if not self._finished:
            self._fail(UpstreamConnectionError("the upstream closed the connection mid-answer"))

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._finished or self._error is not None or self._conn is None:
            return
        loop = asyncio.get_running_loop()
        if self._paused:
            # We stopped reading (our reader is behind): the silence is ours, not the
            # upstream's. It is timed again from `_resume`.
            self._watchdog = loop.call_later(self._read_timeout, self._check_idle)
            return
        idle = time.monotonic() - self._last_read
        if idle >= self._read_timeout:
            self._fail(UpstreamTimeout(f"no data from upstream for {self._read_timeout:g}s"))
            conn = self._conn
            if conn is not None:
                conn.close()
            return
        self._watchdog = loop.call_later(self._read_timeout - idle, self._check_idle)


class HttptoolsTransport(UpstreamTransport):
    """The default transport: one pre-built request head and one keep-alive pool per upstream.

    Args:
        endpoint: the upstream's URL and key.
        connect_timeout: seconds to open a connection (TCP and TLS).
        read_timeout: seconds without a byte from the upstream before the answer fails.
        ssl_context: verifies an HTTPS upstream; None takes the system's and certifi's CAs.
    """

    def __init__(
        self,
        endpoint: UpstreamEndpoint,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.read_timeout = read_timeout
        self._head = (
            f"POST {endpoint.path} HTTP/1.1\r\n"
            f"Host: {endpoint.host_header}\r\n"
            f"Authorization: Bearer {endpoint.api_key}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Content-Length: "
        ).encode()
        context = None
        if endpoint.scheme == "https":
            context = ssl_context or default_ssl_context()
        self._pool = _Pool(endpoint.host, endpoint.port, context, connect_timeout)

    async def send(self, body: bytes) -> UpstreamResponse:
        """The pre-built head plus `body`, sent on a pooled connection; returns once the
        status line and headers have arrived."""
        request = self._head + str(len(body)).encode() + b"\r\n\r\n" + body
        response = HttptoolsResponse(self._pool, request, self.read_timeout)
        try:
            await response.start()
        except BaseException:
            response._close()
            raise
        return response

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self._pool.close()
