"""Where our wire formats carry credentials, and text with those values masked.

One set of rules for everything that shows or keeps a URL or a header: the logging filter
(`web/logs.py`) runs them on every log line, the callback and conversation records run them on
the URLs they store (`webhook_url`, `callback_url`, `conversation_url`). Pure functions on
strings, no I/O. The rules look for the shapes a credential travels in, so they also catch
values nobody configured here (a key someone else guessed, a provider's token):

- URL query parameters: `?key=`, `?token=` (ours), `?t=` (a Daily meeting token),
  `?signature=`/`?sig=`, and the usual names (`api_key`, `access_token`, `secret`…);
- our callback paths with the token in the path (`/callbacks/argil/<token>`);
- a password in a URL's userinfo (`postgresql://user:<password>@host`);
- header lines and header pairs (`Authorization: …`, `x-api-key: …`, `X-Webhook-Signature:
  …`, cookies, and `Sec-WebSocket-Protocol`, which carries `bearer.<key>` for browsers);
- quoted fields of a dict or JSON text (`"api_key": "…"`, `(b'authorization', b'…')`);
- `Bearer <token>` and `bearer.<token>` anywhere, and anything shaped like a JWT.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

#: Query parameters whose value is a credential.
SECRET_PARAMS = (
    "key",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "meeting_token",
    "callback_token",
    "auth",
    "signature",
    "sig",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "t",  # Daily room URLs carry the meeting token as ?t=
)
#: Headers whose value is a credential (or carries one, like a websocket subprotocol).
SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-webhook-signature",
    "x-signature",
    "x-hub-signature",
    "x-hub-signature-256",
    "cookie",
    "set-cookie",
    "sec-websocket-protocol",
)
#: Field names (JSON keys, dict keys, header tuples) whose value is a credential.
SECRET_FIELDS = tuple(
    dict.fromkeys((*(p for p in SECRET_PARAMS if len(p) > 1), *SECRET_HEADERS, "webhook_secret"))
)


def _names(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@?#]*:)[^\s/@?#]+(@)"), rf"\1{MASK}\2"),
    # ?key=…&token=… (the value ends where the parameter, the URL or a quote ends)
    (
        re.compile(rf"(?i)([?&;](?:{_names(SECRET_PARAMS)})=)[^&;#\s\"'<>]*"),
        rf"\1{MASK}",
    ),
    # /callbacks/<provider>/<token> (not a route template: `/callbacks/argil/{path_token}`)
    (re.compile(r"(?i)(/callbacks/[a-z0-9_\-]+/)[^/?#\s\"'<>{}]+"), rf"\1{MASK}"),
    # "api_key": "…", 'authorization': '…', (b'x-api-key', b'…')
    (
        re.compile(rf"(?i)(b?[\"'](?:{_names(SECRET_FIELDS)})[\"']\s*[:,=]\s*b?[\"'])[^\"']*"),
        rf"\1{MASK}",
    ),
    # Authorization: … (a header line, to its end)
    (re.compile(rf"(?im)\b((?:{_names(SECRET_HEADERS)})\s*:\s*)[^\s\"'][^\r\n\"']*"), rf"\1{MASK}"),
    # Bearer … / bearer.… (a websocket subprotocol)
    (re.compile(r"(?i)\b(bearer[ .]+)(?!\*\*\*)[A-Za-z0-9\-._~+/]+=*"), rf"\1{MASK}"),
    # a JWT (Daily meeting tokens are JWTs)
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"), MASK),
)
# A cheap first look: text without any of these cannot match a rule.
_HINT = re.compile(
    rf"(?i)[?&;@]|/callbacks/|bearer|eyJ|{_names(SECRET_FIELDS)}",
)


def redact_text(text: str) -> str:
    """`text` with every credential value the rules above recognise replaced by `***`."""
    if not _HINT.search(text):
        return text
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def redact_url(url: Any) -> Any:
    """A URL as we may show or store it (anything that is not a string is returned as is)."""
    return redact_text(url) if isinstance(url, str) else url
