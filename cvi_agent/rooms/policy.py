"""Which rooms the bot may join: an allow-list of hosts, checked wherever a bot is sent.

A `conversation_url` comes from API clients, from Tavus, from lease rows in the database and
from the command line; whatever joins it opens a connection from this machine. Without a
check, anyone holding an API key could make the server connect to any address it can reach
(its own loopback services, a cloud metadata endpoint): a server-side request forgery. So the
URL must name a host on `CVI_ROOM_HOSTS` (default Daily's domains, `*.daily.co`: Tavus hands
out `https://tavus.daily.co/<id>`, teams have `https://<team>.daily.co/<room>`), or be a
`ws://`/`wss://` local room on this machine's loopback when `CVI_LOCAL_ROOMS` allows them (the
simulator, tests and offline demos). It is an allow-list, so no spelling of an address (a
decimal IP, `0.0.0.0`, a user-info prefix, a look-alike domain) gets through by being unusual.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from cvi_agent.config import Settings

DEFAULT_ROOM_HOSTS = ("*.daily.co",)
LOCAL_SCHEMES = ("ws", "wss")
SCHEMES = ("https", "http", "wss", "ws")
_NAME = re.compile(r"[a-z0-9\-]+(\.[a-z0-9\-]+)*")  # a DNS name or IPv4: no empty label
_IPV6 = re.compile(r"[0-9a-f:.]+")  # as `urlsplit` gives it, without the brackets


class RoomRefused(ValueError):
    """The bot may not join this URL; the message says why and which setting would allow it.

    Args:
        message: one sentence for an API error, a log line or the CLI's stderr.
        setting: the environment variable that would allow the room, or None when no
            setting can (a malformed URL).
    """

    def __init__(self, message: str, setting: str | None) -> None:
        super().__init__(message)
        self.setting = setting


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _matches(host: str, pattern: str) -> bool:
    """`*.example.com` matches any subdomain (not `example.com` itself); else the exact host."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    """The allow-list, as built from `CVI_ROOM_HOSTS` and `CVI_LOCAL_ROOMS`.

    Args:
        hosts: host names the bot may join (`*.example.com` for any subdomain), any scheme.
        local: whether `ws://`/`wss://` rooms on loopback (`127.0.0.0/8`, `::1`,
            `localhost`) are allowed.
    """

    hosts: tuple[str, ...] = DEFAULT_ROOM_HOSTS
    local: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RoomPolicy:
        """The policy the settings describe (`room_hosts`, `local_rooms`)."""
        return cls(hosts=settings.room_hosts, local=bool(settings.local_rooms))

    def check(self, url: str) -> None:
        """Raise `RoomRefused` unless the bot may join `url`."""
        if not url or len(url) > 2048 or any(c.isspace() or c in "\\\x00" for c in url):
            raise RoomRefused("conversation_url is not a usable room URL.", None)
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 -- raises ValueError on a malformed port
        except ValueError:
            raise RoomRefused("conversation_url is not a usable room URL.", None) from None
        if parts.scheme not in SCHEMES:
            raise RoomRefused("conversation_url must be an http(s) or ws(s) URL.", None)
        if "@" in parts.netloc:
            raise RoomRefused("conversation_url may not carry a user name or password.", None)
        if not (_NAME.fullmatch(host) or (":" in host and _IPV6.fullmatch(host))):
            raise RoomRefused("conversation_url has no usable host.", None)
        if (
            _loopback(host)
            and parts.scheme in LOCAL_SCHEMES
            and not any(_matches(host, p) for p in self.hosts)
        ):
            if self.local:
                return
            raise RoomRefused(
                f"conversation_url is a local room on this machine ({host}); local rooms are "
                "off: set CVI_LOCAL_ROOMS=1 to allow them.",
                "CVI_LOCAL_ROOMS",
            )
        if not any(_matches(host, p) for p in self.hosts):
            raise RoomRefused(
                f"conversation_url host {host!r} is not an allowed room host "
                f"(CVI_ROOM_HOSTS={','.join(self.hosts)}).",
                "CVI_ROOM_HOSTS",
            )
