"""Streaming chat completions from an OpenAI-compatible upstream, over any transport.

The client owns the wire's meaning, once for every transport (`base.py`): the request body
(JSON as the brain built it, unicode intact), an error answer turned into `UpstreamHTTPError`
with its message, and the SSE body decoded into one JSON value per event. Each event is handed
over as the dict `json` made of it (no model object per chunk: this is the hot path).
"""

from __future__ import annotations

import json
import ssl
from collections import deque
from types import TracebackType
from typing import Any, Literal

from cvi_agent.llm.upstream.base import UpstreamEndpoint, UpstreamResponse, UpstreamTransport
from cvi_agent.llm.upstream.decoder import SSEDecoder
from cvi_agent.llm.upstream.errors import UpstreamConnectionError, UpstreamHTTPError, error_message
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
    so the upstream stops generating.
    """

    __slots__ = ("_decoder", "_ended", "_events", "_response")

    def __init__(self, response: UpstreamResponse) -> None:
        """Decode `response`'s body; the stream owns it and closes it."""
        self._response = response
        self._decoder = SSEDecoder()
        self._events: deque[Any] = deque()
        self._ended = False

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> Any:
        events = self._events
        while not events:
            if self._ended or self._decoder.done:
                raise StopAsyncIteration
            try:
                chunk = await self._response.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._decoder.flush(events)
                continue
            self._decoder.feed(chunk, events)
        event = events.popleft()
        if isinstance(event, BaseException):
            raise event
        return event

    async def aclose(self) -> None:
        """Close the response (idempotent); see `UpstreamResponse.aclose`."""
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
