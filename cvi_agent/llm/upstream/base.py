"""The one small interface every upstream client implements.

A transport sends a chat-completion request to one OpenAI-compatible endpoint and hands back
an `UpstreamResponse`: the status, the headers, and the body as bytes as they arrive. What
those bytes mean (SSE events, error bodies) is decided above it, in `client.py`, once for all
transports; what a transport owns is the connection: pooling, keep-alive, timeouts, TLS,
backpressure, and closing at once when the reader gives up (so the upstream stops generating).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cvi_agent import __version__

USER_AGENT = f"cvi-agent/{__version__}"


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """Where chat requests go and how they authenticate, parsed once per upstream.

    Args:
        base_url: the OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`.
        api_key: sent as `Authorization: Bearer <key>`.
    """

    base_url: str
    api_key: str
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, base_url: str, api_key: str) -> UpstreamEndpoint:
        """Check and split `base_url`; raises ValueError when it is not http(s)://host…."""
        base_url = base_url.rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port][/path]: {base_url}")
        default = 443 if parts.scheme == "https" else 80
        return cls(
            base_url=base_url,
            api_key=api_key,
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port or default,
            path=(parts.path or "") + "/chat/completions",
        )

    @property
    def url(self) -> str:
        """The chat completions URL."""
        return self.base_url + "/chat/completions"

    @property
    def host_header(self) -> str:
        """The `Host` header: the port only when it is not the scheme's default, IPv6 in []."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        default = self.port == (443 if self.scheme == "https" else 80)
        return host if default else f"{host}:{self.port}"


class UpstreamResponse(ABC):
    """An answer whose headers are in; `async for chunk in response` yields the body's bytes.

    Iteration raises `UpstreamConnectionError` (or `UpstreamTimeout`) when the connection
    breaks or goes quiet past the read timeout. Always close it: `aclose()` before the end of
    the body closes the connection, which is how the upstream learns to stop generating.
    """

    __slots__ = ("headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: Sequence[tuple[bytes, bytes]] = ()

    def __aiter__(self) -> UpstreamResponse:
        return self

    @abstractmethod
    async def __anext__(self) -> bytes:
        """The next bytes of the body (whatever has arrived, never empty)."""

    @abstractmethod
    async def aclose(self, *, done: bool = False) -> None:
        """Stop reading. The connection goes back to the pool when the body has ended, and is
        closed otherwise, except with `done`: the reader saw the protocol's own end (`[DONE]`),
        so only the body's framing can still be on its way; the transport may wait for it a
        moment, without holding the reader, to keep the connection."""


class UpstreamTransport(ABC):
    """Sends chat-completion requests to one endpoint (see `UpstreamEndpoint`)."""

    @abstractmethod
    async def send(self, body: bytes) -> UpstreamResponse:
        """POST `body` (JSON) to the endpoint and return once the response's headers are in.

        Raises `UpstreamConnectionError` (or `UpstreamTimeout`) when no answer comes; a non-2xx
        status is an answer, not an error, at this level.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close every pooled connection; the transport is not used again."""
