"""Streaming chat completions from an OpenAI-compatible upstream, over any transport.

The client owns the wire's meaning, once for every transport (`base.py`): the request body
(JSON as the brain built it, unicode intact), an error answer turned into `UpstreamHTTPError`
with its message, and the SSE body decoded into one JSON value per event. Each event is handed
over as the dict `json` made of it (no model object per chunk: this is the hot path).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from types import TracebackType
from typing import Any, Literal

from cvi_agent.llm.upstream.base import UpstreamEndpoint, UpstreamResponse, UpstreamTransport
from cvi_agent.llm.upstream.decoder import SSEDecoder
from cvi_agent.llm.upstream.errors import (
    UpstreamConnectionError,
    UpstreamDeadline,
    UpstreamHTTPError,
    error_message,
)
from cvi_agent.llm.upstream.httptools import HttptoolsTransport
from cvi_agent.llm.upstream.proxy import ProxyTransport, proxy_for

TransportName = Literal["httptools", "aiohttp"]
_MAX_ERROR_BODY = 64 * 1024


def open_transport(
    endpoint: UpstreamEndpoint,
    name: TransportName = "httptools",
    connect_timeout: float = 2.0,
    read_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    force_proxy: bool = False,
) -> UpstreamTransport:
    """The transport for one upstream: the proxy transport when the environment names a proxy
    for it (the direct transports do not speak to proxies), else the one named.

    Args:
        endpoint: the upstream's URL and key.
        name: `httptools` (hand-written, the default) or `aiohttp`.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds without a byte from the upstream before the answer fails.
        ssl_context: verifies an HTTPS upstream (a private CA); None takes the system's and
            certifi's CAs. The proxy transport verifies with httpx's defaults.
        force_proxy: take the proxy transport even when no proxy applies (tests).
    """
    if force_proxy or proxy_for(endpoint.base_url):
        return ProxyTransport(endpoint, connect_timeout, read_timeout)
    if name == "httptools":
        return HttptoolsTransport(endpoint, connect_timeout, read_timeout, ssl_context)
    if name == "aiohttp":
        # aiohttp is heavy to import and only this choice needs it: imported when chosen.
        from cvi_agent.llm.upstream.aiohttp import AiohttpTransport

        return AiohttpTransport(endpoint, connect_timeout, read_timeout, ssl_context)
    raise ValueError(f"unknown upstream transport {name!r} (httptools or aiohttp)")


class ChatStream:
    """One streamed response: `async for event in stream` yields each `data:` JSON value.

    Always close it (`async with` or `aclose()`); closing before the end closes the connection,
    so the upstream stops generating. `expire_at` bounds it in time, whatever the upstream does.
    """

    __slots__ = (
        "_decoder",
        "_ended",
        "_events",
        "_expired",
        "_last_data",
        "_reading",
        "_response",
        "_task",
        "_timer",
    )

    def __init__(self, response: UpstreamResponse) -> None:
        """Decode `response`'s body; the stream owns it and closes it."""
        self._response = response
        self._decoder = SSEDecoder()
        self._events: deque[Any] = deque()
        self._ended = False
        self._reading = False  # a read of the upstream is under way (the task waits on it)
        self._last_data = time.monotonic()  # when the last bytes came (for the deadline's cause)
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> Any:
        events = self._events
        while not events:
            if self._ended or self._decoder.done:
                raise StopAsyncIteration
            self._reading = True
            try:
                # No local name for the bytes: a frame in an error's traceback keeps its
                # locals, and this one may be megabytes.
                self._decoder.feed(await self._response.__anext__(), events)
            except StopAsyncIteration:
                self._ended = True
                self._decoder.flush(events)
                continue
            except asyncio.CancelledError:
                # The deadline interrupted this read (`_expire`): its error is queued. Any other
                # cancellation (also one that came at the same moment) goes on.
                task = self._task
                if self._expired and task is not None and task.uncancel() == 0:
                    continue
                raise
            finally:
                self._reading = False
            self._last_data = time.monotonic()
        event = events.popleft()
        if isinstance(event, BaseException):
            try:
                raise event
            finally:
                event = None  # or error → traceback → this frame → error: a cycle
        return event

    def expire_at(self, when: float) -> None:
        """End the stream at `when` (the event loop's clock): from then on the next event is an
        `UpstreamDeadline`, also when the task is waiting for the upstream at that moment
        (the wait is interrupted) and also over events already received. One timer for the
        whole stream, nothing per event. Read the stream in the task that calls this."""
        if self._timer is not None:
            self._timer.cancel()
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        events = self._events
        if not events and (self._ended or self._decoder.done):
            return  # the whole reply was read: nothing to cut
        if not self._reading:
            cause = "its events were still being read (a slow caller)"
        else:
            silent = time.monotonic() - self._last_data
            if silent >= 0.5:
                cause = f"the upstream had been silent for {silent:.1f}s"
            else:
                cause = "the upstream was still sending"
        self._expired = True
        events.clear()
        events.append(UpstreamDeadline(cause))
        if self._reading and self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        """Close the response (idempotent); see `UpstreamResponse.aclose`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._response.aclose(done=self._decoder.done)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class ChatStreamClient:
    """Streams chat completions from one OpenAI-compatible base URL with one API key.

    Args:
        base_url: e.g. `https://api.openai.com/v1`; requests go to `{base_url}/chat/completions`.
        api_key: sent as `Authorization: Bearer <key>`.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds without a byte from the upstream before the answer fails.
        transport: `httptools` (the default) or `aiohttp`; see `open_transport`.
        ssl_context: verifies an HTTPS upstream (a private CA); None takes the system's and
            certifi's CAs.
        force_proxy: take the proxy transport (httpx) even when no proxy applies (tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        transport: TransportName = "httptools",
        ssl_context: ssl.SSLContext | None = None,
        force_proxy: bool = False,
    ) -> None:
        self.endpoint = UpstreamEndpoint.parse(base_url, api_key)
        self.base_url = self.endpoint.base_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.transport = open_transport(
            self.endpoint, transport, connect_timeout, read_timeout, ssl_context, force_proxy
        )

    @property
    def via_proxy(self) -> bool:
        """Whether requests go through the proxy transport."""
        return isinstance(self.transport, ProxyTransport)

    async def stream(self, params: dict[str, Any]) -> ChatStream:
        """POST the request; returns the started stream (headers received, status 2xx).

        Raises `UpstreamHTTPError` on any other status, `UpstreamConnectionError` (or
        `UpstreamTimeout`) when no answer comes.
        """
        body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        response = await self.transport.send(body)
        if response.status >= 300:
            await _raise_for_status(response)
        return ChatStream(response)

    async def aclose(self) -> None:
        """Close the transport's connections."""
        await self.transport.aclose()


async def _raise_for_status(response: UpstreamResponse) -> None:
    """Read the error answer (up to 64 KiB of it kept), close it, raise `UpstreamHTTPError`."""
    body = bytearray()
    try:
        async for chunk in response:
            if len(body) < _MAX_ERROR_BODY:
                body += chunk
    except UpstreamConnectionError:
        pass  # the status is the answer; a body cut short only shortens its message
    finally:
        await response.aclose()
    raise UpstreamHTTPError(response.status, error_message(bytes(body)))
