"""The transport used when an HTTP(S) proxy applies to the upstream: httpx, which knows
proxies (the environment's `HTTPS_PROXY`, `NO_PROXY`, …); same answers, same errors as the
direct transports, at a higher CPU cost per chunk that only proxied deployments pay."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

from cvi_agent.llm.upstream.base import (
    USER_AGENT,
    UpstreamEndpoint,
    UpstreamResponse,
    UpstreamTransport,
)
from cvi_agent.llm.upstream.errors import UpstreamConnectionError, UpstreamTimeout


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url`, or None (none set, or `NO_PROXY` says so)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy:
        return None
    if urllib.request.proxy_bypass(host):
        return None
    return proxy


class ProxyResponse(UpstreamResponse):
    """An httpx streaming response, its errors translated to the upstream's."""

    __slots__ = ("_body", "_response")

    def __init__(self, response: httpx.Response) -> None:
        """Wrap an httpx response opened with `stream=True`; closing it closes the stream."""
        super().__init__()
        self._response = response
        self._body: AsyncIterator[bytes] = response.aiter_raw()
        self.status = response.status_code
        self.headers = response.headers.raw

    async def __anext__(self) -> bytes:
        while True:
            try:
                chunk = await self._body.__anext__()
            except httpx.HTTPError as exc:
                raise UpstreamConnectionError(f"upstream stream failed: {exc}") from None
            if chunk:
                return chunk

    async def aclose(self, *, done: bool = False) -> None:
        """Close the stream (httpx keeps the connection when the body had ended)."""
        await self._response.aclose()


class ProxyTransport(UpstreamTransport):
    """Chat requests through httpx (and so through the environment's proxy).

    Args:
        endpoint: the upstream's URL and key.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait for each read.
    """

    def __init__(
        self, endpoint: UpstreamEndpoint, connect_timeout: float, read_timeout: float
    ) -> None:
        self.url = endpoint.url
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {endpoint.api_key}", "User-Agent": USER_AGENT},
        )

    async def send(self, body: bytes) -> UpstreamResponse:
        """POST `body` through httpx, which applies the environment's proxy settings."""
        request = self._client.build_request(
            "POST",
            self.url,
            content=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise UpstreamConnectionError(f"upstream request failed: {exc}") from None
        return ProxyResponse(response)

    async def aclose(self) -> None:
        """Close the httpx client and its connections."""
        await self._client.aclose()
