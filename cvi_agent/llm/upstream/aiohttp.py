"""The upstream transport on aiohttp's client: a well-kept library instead of hand-written
HTTP, selectable with `CVI_UPSTREAM_TRANSPORT=aiohttp` (see ARCHITECTURE.md, "Upstream
transport", for what it costs against the httptools transport on `cvi-agent bench`).

Configured for this wire only: one session per upstream with its headers set once, no
cookies, no compression negotiated (the events are read as they are sent), no pool limit (the
number of concurrent calls is the limit), keep-alive for as long as the httptools pool keeps
idle connections. aiohttp retries a request on a reused connection that the upstream closed
only for idempotent methods; this transport does it for the chat POST too, once, when the
upstream closed without answering (it never started the reply).
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from yarl import URL

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

_IDLE_TIMEOUT = 30.0  # seconds an idle connection is kept, as in the httptools pool
_LINGER = 1.0  # seconds to wait for the body's end after `[DONE]` before dropping the connection


class AiohttpResponse(UpstreamResponse):
    """An aiohttp response; its body read with `readany` (all that is buffered at once)."""

    __slots__ = ("_content", "_read_timeout", "_response")

    def __init__(self, response: aiohttp.ClientResponse, read_timeout: float) -> None:
        """Wrap `response`; `read_timeout` only names the limit in errors (aiohttp enforces it)."""
        super().__init__()
        self._response = response
        self._content = response.content
        self._read_timeout = read_timeout
        self.status = response.status
        self.headers = response.raw_headers

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except aiohttp.SocketTimeoutError:
            raise UpstreamTimeout(f"no data from upstream for {self._read_timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamConnectionError(
                f"the upstream closed the connection mid-answer: {exc}"
            ) from None
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self, *, done: bool = False) -> None:
        """Give the connection back to the pool when the body has ended (or `done` says the reader
        saw the end), else close it so the upstream stops generating."""
        response = self._response
        content = self._content
        if content.is_eof():
            response.release()  # the body has ended: the connection goes back to the pool
        elif done and content.exception() is None:
            # The end of the body releases the connection on its own (aiohttp does that for a
            # response whose payload ends); drop it if that end is slow to come.
            asyncio.get_running_loop().call_later(_LINGER, response.close)
        else:
            response.close()


class AiohttpTransport(UpstreamTransport):
    """Chat requests through one `aiohttp.ClientSession` per upstream; build it on the running
    loop (aiohttp binds its connector to it), as `Runtime.start` does.

    Args:
        endpoint: the upstream's URL and key.
        connect_timeout: seconds to open a connection (DNS, TCP and TLS).
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
        self.url = URL(endpoint.url)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        context: ssl.SSLContext | bool = False
        if endpoint.scheme == "https":
            context = ssl_context or default_ssl_context()
        self._connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=_IDLE_TIMEOUT, ssl=context
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            headers={
                "Authorization": f"Bearer {endpoint.api_key}",
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                "User-Agent": USER_AGENT,
            },
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect_timeout, sock_read=read_timeout or None
            ),
        )

    async def send(self, body: bytes) -> UpstreamResponse:
        """POST `body`; a keep-alive connection the upstream closed before answering is retried once."""
        retried = False
        while True:
            try:
                response = await self._session.post(self.url, data=body)
            except aiohttp.ConnectionTimeoutError:
                raise UpstreamTimeout(
                    f"could not connect to the upstream within {self.connect_timeout:g}s"
                ) from None
            except aiohttp.SocketTimeoutError:
                raise UpstreamTimeout(f"no data from upstream for {self.read_timeout:g}s") from None
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamConnectionError(
                    connect_failure(exc.os_error, exc.host, exc.port)
                ) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if not retried:
                    retried = True
                    continue  # closed before answering: a stale keep-alive connection
                raise UpstreamConnectionError(
                    f"the upstream closed the connection before answering: {exc}"
                ) from None
            except aiohttp.ClientError as exc:
                raise UpstreamConnectionError(f"upstream request failed: {exc}") from None
            return AiohttpResponse(response, self.read_timeout)

    async def aclose(self) -> None:
        """Close the session and every pooled connection."""
        await self._session.close()
