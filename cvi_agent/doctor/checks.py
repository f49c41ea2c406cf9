"""Each check of `cvi-agent doctor`: one `Check` (OK, WARN or FAIL, what was found, what to set
to fix it), every network step bounded by the caller's `within` (seconds).

`run_checks` is the full doctor: it asks every persona's upstream one tiny question (one token)
and Tavus for one persona. `startup_checks` is what `cvi-agent serve` runs before it prints its
banner: no request that costs anything, everything concurrent and bounded by about a second;
its database and Redis results decide whether the server can start at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
import redis.asyncio as redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cvi_agent.config import Settings
from cvi_agent.personas import Persona
from cvi_agent.protocol.redact import MASK, redact_text
from cvi_agent.store import SqlStore
from cvi_agent.store.schema import MIGRATIONS, applied_version
from cvi_agent.tavus.client import TavusAuthError, TavusClient, TavusError

Status = Literal["OK", "WARN", "FAIL"]
#: Seconds each network step of `cvi-agent doctor` may take.
DOCTOR_TIMEOUT = 5.0
#: Seconds the start-up checks may take altogether.
STARTUP_TIMEOUT = 1.0
LATEST_SCHEMA = max(version for version, _ in MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Check:
    """One finding.

    Args:
        name: what was checked (`database`, `upstream storyteller`, `TAVUS_API_KEY`…).
        status: OK, WARN (works, but not as configured or intended) or FAIL (a configured
            feature cannot work).
        detail: what was found, one line, no secret.
        fix: what to set or do about it (empty when OK).
    """

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self, status: bool = True) -> str:
        """`FAIL database: … — fix: …` (without the status when `status` is False)."""
        text = f"{self.name}: {self.detail}"
        if status:
            text = f"{self.status:<4} {text}"
        return f"{text} — fix: {self.fix}" if self.fix else text


def _clean(text: str, *secrets: str) -> str:
    """One line of someone else's text, without our secrets, bounded."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = " ".join(redact_text(text).split())
    return text if len(text) <= 160 else text[:160] + "…"


def cause_of(exc: BaseException) -> str:
    """What went wrong, one bounded line without credentials."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc) or type(exc).__name__
    return _clean(f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text)


# -- upstreams ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where one persona's upstream brain (or one of its fallbacks) sends its turns, resolved
    exactly as `llm/brains/upstream.py` does."""

    name: str
    url: str
    model: str
    key: str
    key_name: str
    url_setting: str


def upstream_targets(persona: Persona, settings: Settings) -> list[UpstreamTarget]:
    """The persona's upstream and its fallbacks (none for flow and echo brains)."""
    brain = persona.brain
    if brain.kind != "upstream":
        return []
    chain = [(brain.base_url, brain.model or "", brain.api_key_env)]
    chain += [(f.base_url, f.model, f.api_key_env) for f in brain.fallbacks]
    targets = []
    for i, (base_url, model, key_env) in enumerate(chain):
        key = (os.environ.get(key_env, "") if key_env else "") or settings.upstream_api_key
        key_name = f"{key_env} (or CVI_UPSTREAM_API_KEY)" if key_env else "CVI_UPSTREAM_API_KEY"
        where = f"brain.base_url in {persona.name}'s persona file"
        targets.append(
            UpstreamTarget(
                name=f"upstream {persona.name}" + (f" (fallback {i})" if i else ""),
                url=(base_url or settings.upstream_base_url).rstrip("/"),
                model=model,
                key=key,
                key_name=key_name,
                url_setting=where if base_url else "CVI_UPSTREAM_BASE_URL",
            )
        )
    return targets


async def _resolve(url: str) -> None:
    """Look the URL's host up, in a daemon thread of its own: a resolver that hangs past the
    caller's timeout must not hold up the event loop's shutdown (`asyncio.run` waits for the
    default executor's threads), hence the start of the server."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    def lookup() -> None:
        error: BaseException | None = None
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True).start()
    await done


async def check_upstream(target: UpstreamTarget, within: float, ask: bool = True) -> Check:
    """Key present, host resolvable and, with `ask`, one one-token completion answered."""
    host = urlsplit(target.url).hostname or target.url
    no_key = "" if target.key else f"; {target.key_name} is not set"
    set_key = f"; set {target.key_name}" if no_key else ""
    try:
        await asyncio.wait_for(_resolve(target.url), within)
    except TimeoutError:
        return Check(
            target.name,
            "FAIL" if ask else "WARN",
            f"{host} did not resolve within {within:g} s{no_key}",
            f"check the network, or set {target.url_setting}{set_key}",
        )
    except (OSError, ValueError) as exc:
        return Check(
            target.name,
            "FAIL",
            f"cannot resolve {host} ({cause_of(exc)}){no_key}; its turns fall back",
            f"set {target.url_setting} to a reachable OpenAI-compatible URL, or check the "
            f"network{set_key}",
        )
    if not ask:
        if not target.key:
            return Check(
                target.name,
                "WARN",
                f"{target.key_name} is not set: unless {host} takes no key, its turns fall back",
                f"set {target.key_name} (`cvi-agent doctor` tests it)",
            )
        return Check(target.name, "OK", f"{target.model} at {target.url} (key set)")
    return await _ask(target, within)


async def _ask(target: UpstreamTarget, within: float) -> Check:
    headers = {"authorization": f"Bearer {target.key}"} if target.key else {}
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": "Reply with one word."}],
        "max_tokens": 1,
        "stream": False,
    }
    missing = "" if target.key else f"; {target.key_name} is not set"
    try:
        async with httpx.AsyncClient(timeout=within) as http:
            response = await asyncio.wait_for(
                http.post(target.url + "/chat/completions", json=body, headers=headers), within
            )
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return Check(
            target.name,
            "FAIL",
            f"{target.url} did not answer ({cause_of(exc)}){missing}",
            f"check {target.url_setting} and the network"
            + (f"; set {target.key_name}" if missing else ""),
        )
    if response.status_code < 300:
        how = "" if target.key else " without a key"
        return Check(target.name, "OK", f"{target.model} at {target.url} answered{how}")
    said = _clean(response.text, target.key)
    if response.status_code in (401, 403):
        return Check(
            target.name,
            "FAIL",
            f"{target.url} refused the key (HTTP {response.status_code}: {said}){missing}",
            f"set {target.key_name} to a valid key",
        )
    return Check(
        target.name,
        "FAIL",
        f"{target.url} answered HTTP {response.status_code} for {target.model}: {said}",
        f"check the persona's brain.model and {target.url_setting}",
    )


# -- database and Redis -------------------------------------------------------------------------


def shown_url(url: str) -> str:
    """A database or Redis URL as it may be printed (no password)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return redact_text(url)


async def _schema_version(url: str) -> int:
    store = SqlStore(url)
    try:
        async with store.engine.connect() as conn:
            if not await conn.run_sync(lambda c: sa.inspect(c).has_table("schema_version")):
                return 0  # a database never migrated (serve creates the schema)
            return await applied_version(conn)
    finally:
        await store.aclose()


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


async def check_database(settings: Settings, within: float) -> Check:
    """Connect and read the schema version: current, behind (serve migrates) or ahead."""
    url = settings.database_url
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        folder = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if not os.access(folder, os.W_OK):
            return Check(
                "database",
                "FAIL",
                f"cannot create the SQLite file {path} ({folder} is not writable)",
                "set CVI_DATABASE_URL to a writable place",
            )
        return Check("database", "OK", f"SQLite {path} (created at the first start)")
    try:
        version = await asyncio.wait_for(_schema_version(url), within)
    except Exception as exc:
        return Check(
            "database",
            "FAIL",
            f"cannot connect to {shown_url(url)} ({cause_of(exc)})",
            "start the database, or set CVI_DATABASE_URL",
        )
    if version > LATEST_SCHEMA:
        return Check(
            "database",
            "FAIL",
            f"schema version {version} is newer than this cvi-agent's ({LATEST_SCHEMA})",
            "upgrade cvi-agent, or point CVI_DATABASE_URL at another database",
        )
    if version < LATEST_SCHEMA:
        return Check(
            "database",
            "WARN",
            f"{shown_url(url)}: schema version {version} of {LATEST_SCHEMA}",
            "`cvi-agent serve` applies the missing migrations when it starts",
        )
    return Check("database", "OK", f"{shown_url(url)}, schema version {version} (current)")


async def ping_redis(url: str, within: float) -> None:
    """One PING (raises what went wrong)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=within, socket_timeout=within)
    try:
        await asyncio.wait_for(client.ping(), within)
    finally:
        await client.aclose()


async def check_redis(settings: Settings, within: float) -> Check:
    """Redis answers a PING, when CVI_REDIS_URL is set."""
    if not settings.redis_url:
        return Check("redis", "OK", "not configured (CVI_REDIS_URL): one process, in-memory bus")
    try:
        await ping_redis(settings.redis_url, within)
    except Exception as exc:
        return Check(
            "redis",
            "FAIL",
            f"cannot reach {shown_url(settings.redis_url)} ({cause_of(exc)})",
            "start Redis, or unset CVI_REDIS_URL (one server process)",
        )
    return Check("redis", "OK", f"{shown_url(settings.redis_url)} answered")


# -- Tavus --------------------------------------------------------------------------------------


async def check_tavus_key(settings: Settings, within: float) -> Check:
    """TAVUS_API_KEY accepted by one cheap request (list one persona)."""
    name = "TAVUS_API_KEY"
    if not settings.tavus_api_key:
        return Check(name, "OK", "not set (Tavus personas, conversations and interactions off)")
    client = TavusClient(
        settings.tavus_api_key, settings.tavus_api_url, timeout=within, max_retries=0
    )
    try:
        await asyncio.wait_for(client.request("GET", "/v2/personas", params={"limit": 1}), within)
    except TavusAuthError as exc:
        return Check(
            name,
            "FAIL",
            f"{settings.tavus_api_url} refused it (HTTP {exc.status})",
            "set TAVUS_API_KEY to a key from the Tavus developer portal",
        )
    except (TavusError, TimeoutError) as exc:
        detail = exc.message if isinstance(exc, TavusError) else "no answer in time"
        return Check(
            name,
            "FAIL",
            f"{settings.tavus_api_url} did not answer ({_clean(detail, settings.tavus_api_key)})",
            "check the network, or TAVUS_API_URL",
        )
    finally:
        await client.aclose()
    return Check(name, "OK", f"accepted by {settings.tavus_api_url}")


def _local(host: str) -> bool:
    if host in ("localhost", "") or host.endswith((".localhost", ".local")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


def check_public_url(settings: Settings) -> Check:
    """CVI_PUBLIC_URL must be reachable from Tavus when Tavus is used."""
    name = "CVI_PUBLIC_URL"
    host = urlsplit(settings.public_url).hostname or ""
    if not _local(host):
        return Check(name, "OK", settings.public_url)
    if not settings.tavus_api_key:
        return Check(name, "OK", f"{settings.public_url} (local: fine without Tavus)")
    return Check(
        name,
        "FAIL",
        f"{settings.public_url} is a local address: Tavus cannot reach the personas' LLM "
        "endpoint or send callbacks",
        "set CVI_PUBLIC_URL to this server's public https URL (a tunnel in development)",
    )


def check_callback_token(settings: Settings) -> Check:
    """The callback token Tavus's callbacks authenticate with."""
    name = "CVI_CALLBACK_TOKEN"
    if settings.callback_tokens:
        return Check(name, "OK", f"set ({len(settings.callback_tokens)} accepted)")
    stored = settings.var_dir / "callback-token"
    if not settings.api_keys:
        where = f"{stored}" if stored.exists() else f"{stored}, written at the first start"
        return Check(name, "OK", f"not set: development mode uses the token in {where}")
    return Check(
        name,
        "FAIL" if settings.tavus_api_key else "WARN",
        "not set: /callbacks/tavus answers 503, so conversations' transcripts and "
        "perception analyses are lost",
        "set CVI_CALLBACK_TOKEN to a long random value (e.g. `openssl rand -hex 32`)",
    )


# -- together -----------------------------------------------------------------------------------


async def _gather(checks: Sequence[Awaitable[Check]]) -> list[Check]:
    return list(await asyncio.gather(*checks))


async def run_checks(
    settings: Settings, personas: dict[str, Persona], within: float = DOCTOR_TIMEOUT
) -> list[Check]:
    """Every check, concurrently (each network step bounded by `within`), in a fixed order."""
    upstreams = [t for name in sorted(personas) for t in upstream_targets(personas[name], settings)]
    found = await _gather(
        [
            check_database(settings, within),
            check_redis(settings, within),
            *(check_upstream(t, within) for t in upstreams),
            check_tavus_key(settings, within),
        ]
    )
    return [*found, check_public_url(settings), check_callback_token(settings)]


async def startup_checks(
    settings: Settings, personas: dict[str, Persona], within: float = STARTUP_TIMEOUT
) -> list[Check]:
    """The start-up subset: database, Redis, each upstream's key and host (no request), the
    public URL and the callback token; concurrent, about `within` seconds at most (the
    database's connect timeout, 5 s, excepted). Pending migrations are no warning here:
    the server is about to apply them."""
    upstreams = [t for name in sorted(personas) for t in upstream_targets(personas[name], settings)]
    found = await _gather(
        [
            check_database(settings, max(within, 5.0)),
            check_redis(settings, within),
            *(check_upstream(t, within, ask=False) for t in upstreams),
        ]
    )
    database = found[0]
    if database.status == "WARN":  # migrations pending: starting is what applies them
        found[0] = Check("database", "OK", f"{database.detail} (migrating now)")
    return [*found, check_public_url(settings), check_callback_token(settings)]
