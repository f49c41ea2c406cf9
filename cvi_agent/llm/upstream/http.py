"""A lean client for OpenAI-compatible streaming chat completions (the upstream's wire).

Why not the `openai` SDK here: profiling `cvi-agent bench` showed the SDK building a pydantic
object per streamed chunk, its request pipeline and httpcore's pool scan costing over half of
the server's CPU per relayed chunk. This client speaks exactly the same wire (HTTP/1.1, `POST
{base_url}/chat/completions`, SSE `data:` events, `[DONE]`) with the C parser uvicorn already
uses (httptools) and hands each event over as the dict `json.loads` made of it.

- One pool of keep-alive connections per upstream (scheme, host, port), shared by every request.
- Closing a stream before its end closes its connection at once: the upstream sees the
  disconnect and stops generating.
- A request on a reused connection that the upstream closed before answering is retried once
  on a new connection (the upstream never saw it).
- When an HTTP(S) proxy applies to the upstream (environment variables), requests go through
  httpx instead, which knows proxies; same events, same errors.
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httptools

from cvi_agent import __version__

_loads = json.loads
# The C scanner straight away: `json.loads` on bytes runs a pure-Python encoding detection and
# two wrapper calls per event, which profiling showed at ~1/3 of the per-chunk decode cost.
_scan: Any = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_MAX_ERROR_BODY = 64 * 1024
_PAUSE_AT = 64  # queued events before we stop reading from the socket (backpressure)
USER_AGENT = f"cvi-agent/{__version__}"


class UpstreamHTTPError(Exception):
    """The upstream answered with a non-2xx status; `message` is safe to log."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class UpstreamConnectionError(Exception):
    """The upstream could not be reached, or the connection broke mid-answer."""


class UpstreamTimeout(UpstreamConnectionError):
    pass


def _error_message(body: bytes) -> str:
    try:
        payload = _loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(payload, dict) and payload.get("message"):
            return str(payload["message"])[:300]
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:300].decode(errors="replace") or "no body"


class SSEDecoder:
    """Incremental SSE decoder: bytes in, one JSON value per `data:` event out.

    Only `data:` fields matter on this wire; `[DONE]` ends the stream.
    """

    __slots__ = ("_buf", "_data", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self.done = False

    def feed(self, chunk: bytes, out: deque[Any]) -> None:
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


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to the upstream; carries one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True
        self.reused = False
        self.idle_since = 0.0
        self.stream: ChatStream | None = None

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
            raise UpstreamConnectionError(
                f"could not connect to the upstream: {exc.strerror or exc}"
            ) from None
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


class ChatStream:
    """One streamed response: `async for event in stream` yields each `data:` JSON value.

    Always close it (`async with` or `aclose()`); closing before the end closes the connection.
    """

    __slots__ = (
        "_conn",
        "_decoder",
        "_error",
        "_error_body",
        "_events",
        "_finished",
        "_headers_waiter",
        "_keep_alive",
        "_last_read",
        "_lingering",
        "_paused",
        "_pool",
        "_read_timeout",
        "_request",
        "_status",
        "_waiter",
        "_watchdog",
        "got_bytes",
    )

    def __init__(self, pool: _Pool, request: bytes, read_timeout: float) -> None:
        self._pool = pool
        self._request = request
        self._read_timeout = read_timeout
        self._conn: _Connection | None = None
        self._decoder = SSEDecoder()
        self._events: deque[Any] = deque()
        self._status = 0
        self._error: BaseException | None = None
        self._error_body: bytearray | None = None
        self._finished = False
        self._keep_alive = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._headers_waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._lingering = False
        self.got_bytes = False

    # ------------------------------------------------------------ consumer side

    async def start(self) -> ChatStream:
        """Send the request and wait for the response headers; raises on a non-2xx answer."""
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
        if self._status >= 300:
            await self._drain_error()
        return self

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
        self._status = 0
        self.got_bytes = False

    async def _drain_error(self) -> None:
        if self._error_body is None:  # the body may have come in the headers' packet
            self._error_body = bytearray()
        while not self._finished and self._error is None:
            await self._wait()
        body = bytes(self._error_body)
        status = self._status
        await self.aclose()
        raise UpstreamHTTPError(status, _error_message(body))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        events = self._events
        while not events:
            if self._error is not None:
                raise self._error
            if self._finished or self._decoder.done:
                raise StopAsyncIteration
            await self._wait()
        event = events.popleft()
        if self._paused and len(events) < _PAUSE_AT // 2:
            self._resume()
        if isinstance(event, BaseException):
            raise event
        return event

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.alive:
            conn.transport.resume_reading()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
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
        elif self._decoder.done and not self._finished and self._error is None:
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

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    # ------------------------------------------------------------ protocol side

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _headers(self, status: int) -> None:
        self._status = status
        self.got_bytes = True
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body(self, body: bytes) -> None:
        self._last_read = time.monotonic()
        if self._error_body is not None or self._status >= 300:
            if self._error_body is None:
                self._error_body = bytearray()
            if len(self._error_body) < _MAX_ERROR_BODY:
                self._error_body += body
            return
        events = self._events
        decoder = self._decoder
        decoder.feed(body, events)
        if events:
            if len(events) >= _PAUSE_AT and not self._paused:
                conn = self._conn
                if conn is not None and conn.transport is not None:
                    self._paused = True
                    conn.transport.pause_reading()
            self._wake()
        elif decoder.done:  # `[DONE]` alone: the reader is finished, whatever comes after
            self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self._decoder.flush(self._events)
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
        idle = time.monotonic() - self._last_read
        if idle >= self._read_timeout:
            self._fail(UpstreamTimeout(f"no data from upstream for {self._read_timeout:g}s"))
            conn = self._conn
            if conn is not None:
                conn.close()
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._read_timeout - idle, self._check_idle)


class _HttpxStream:
    """The same stream over httpx, used when a proxy applies to the upstream."""

    def __init__(self, cm: Any, read_timeout: float) -> None:
        self._cm = cm
        self._response: Any = None
        self._iter: AsyncIterator[bytes] | None = None
        self._decoder = SSEDecoder()
        self._events: deque[Any] = deque()

    async def start(self) -> _HttpxStream:
        import httpx

        try:
            self._response = await self._cm.__aenter__()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise UpstreamConnectionError(f"upstream request failed: {exc}") from None
        if self._response.status_code >= 300:
            body = await self._response.aread()
            status = self._response.status_code
            await self.aclose()
            raise UpstreamHTTPError(status, _error_message(body))
        self._iter = self._response.aiter_raw()
        return self

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        import httpx

        while not self._events:
            if self._decoder.done or self._iter is None:
                raise StopAsyncIteration
            try:
                chunk = await self._iter.__anext__()
            except StopAsyncIteration:
                self._decoder.flush(self._events)
                self._iter = None
                continue
            except httpx.HTTPError as exc:
                raise UpstreamConnectionError(f"upstream stream failed: {exc}") from None
            self._decoder.feed(chunk, self._events)
        event = self._events.popleft()
        if isinstance(event, BaseException):
            raise event
        return event

    async def aclose(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> _HttpxStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy:
        return None
    if urllib.request.proxy_bypass(host):
        return None
    return proxy


class ChatStreamClient:
    """Streams chat completions from one OpenAI-compatible base URL with one API key.

    HTTPS verifies against the system's trust store plus certifi's, unless `ssl_context` is
    given (a private CA).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        force_httpx: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port][/path]: {base_url}")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.path = (parts.path or "") + "/chat/completions"
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = port == (443 if parts.scheme == "https" else 80)
        host_header = host if default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if default_port else f"[{host}]:{port}"
        self._head = (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {host_header}\r\n"
            f"Authorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Content-Length: "
        ).encode()
        self._api_key = api_key
        self._httpx: Any = None
        self._pool: _Pool | None = None
        if force_httpx or _proxy_for(self.base_url):
            import httpx

            self._httpx = httpx.AsyncClient(
                timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            )
        else:
            context = None
            if parts.scheme == "https":
                context = ssl_context or _ssl_context()
            self._pool = _Pool(host, port, context, connect_timeout)

    @property
    def via_proxy(self) -> bool:
        return self._httpx is not None

    async def stream(self, params: dict[str, Any]) -> ChatStream | _HttpxStream:
        """POST the request; returns the started stream (headers received, status 2xx)."""
        body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        if self._httpx is not None:
            cm = self._httpx.stream(
                "POST",
                self.base_url + "/chat/completions",
                content=body,
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            return await _HttpxStream(cm, self.read_timeout).start()
        assert self._pool is not None
        request = self._head + str(len(body)).encode() + b"\r\n\r\n" + body
        stream = ChatStream(self._pool, request, self.read_timeout)
        try:
            return await stream.start()
        except BaseException:
            stream._close()
            raise

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._httpx is not None:
            await self._httpx.aclose()


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        context = ssl.create_default_context()  # the system's trust store...
        try:
            import certifi

            context.load_verify_locations(cafile=certifi.where())  # ...and Mozilla's (slim images)
        except (ImportError, OSError):
            pass
        context.set_alpn_protocols(["http/1.1"])
        _SSL_CONTEXT = context
    return _SSL_CONTEXT
