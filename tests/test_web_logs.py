"""No secret in any log line: the filter on records as loggers make them, and the server run as a
process at debug level, driven through every path that carries a key, a token or a signature,
its whole output searched for each configured secret."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.logging import AccessFormatter
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan
from cvi_agent.runtime import load_checked_personas
from cvi_agent.videos.jogg import signature
from cvi_agent.web.logs import (
    DENIAL_FORMAT,
    FORMAT,
    REJECTED_FORMAT,
    DenialLines,
    RedactingFilter,
    configured_secrets,
    install_log_filters,
)
from tests.procs import ServerProcess
from tests.support import PERSONAS, load_fixture, make_settings

# Distinctive values: any of them in the output is a leak, whatever printed it.
API_KEY = "apikey-Q7v2Lr9Xw4"
SECOND_KEY = "apikey-second-M3k8Tz"
CALLBACK_TOKEN = "cbtoken-Z5n1Pq8Hd2"
UPSTREAM_KEY = "sk-upstream-J6c4Wy0Rb7"
TAVUS_KEY = "tavus-key-F2g9Ks5Vn3"
ARGIL_KEY = "argil-key-T8d3Xc1Lm6"
JOGG_SECRET = "whsec-jogg-B4h7Np2Qs9"
WRONG_KEY = "wrongkey-U1e6Ry3Ga8"  # presented but refused: a key of something else, maybe
SECRETS = (
    API_KEY,
    SECOND_KEY,
    CALLBACK_TOKEN,
    UPSTREAM_KEY,
    TAVUS_KEY,
    ARGIL_KEY,
    JOGG_SECRET,
    WRONG_KEY,
)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def leaks(text: str, secrets: tuple[str, ...]) -> dict[str, list[str]]:
    """Each secret found in `text`, with the lines that carry it."""
    found: dict[str, list[str]] = {}
    for secret in secrets:
        lines = [line for line in text.splitlines() if secret in line]
        if lines:
            found[secret] = lines[:5]
    return found


def record(msg: object, *args: object, name: str = "t", exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"cannot reach https://api.example/v1?api_key={UPSTREAM_KEY}")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args or None, exc_info)


def shown(rec: logging.LogRecord, formatter: logging.Formatter | None = None) -> str:
    assert RedactingFilter([API_KEY, UPSTREAM_KEY]).filter(rec) is True
    return (formatter or logging.Formatter(FORMAT)).format(rec)


def test_filter_masks_arguments_messages_and_tracebacks() -> None:
    class Url:  # an httpx.URL-like argument: only its str() shows the secret
        def __str__(self) -> str:
            return f"http://h/callbacks/tavus?token={CALLBACK_TOKEN}"

    line = shown(record('HTTP Request: %s %s "%s %d"', "POST", Url(), "HTTP/1.1", 200))
    assert "token=***" in line and CALLBACK_TOKEN not in line and '"HTTP/1.1 200"' in line
    # a configured secret nobody could recognise by its shape (an upstream quoting our key)
    line = shown(record("upstream said: Incorrect API key provided: %s", UPSTREAM_KEY))
    assert line.endswith("Incorrect API key provided: ***")
    line = shown(record(f"f-string with {API_KEY} inside"))
    assert API_KEY not in line and "***" in line
    line = shown(record("failed", exc=True))
    assert "RuntimeError: cannot reach https://api.example/v1?api_key=***" in line
    assert UPSTREAM_KEY not in line
    line = shown(record("%(url)s", {"url": f"ws://h/live?key={API_KEY}"}))
    assert line.endswith("ws://h/live?key=***")


def test_uvicorn_access_lines_keep_their_shape() -> None:
    rec = record(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5",
        "GET",
        f"/api/conversations?key={WRONG_KEY}",
        "1.1",
        401,
        name="uvicorn.access",
    )
    line = shown(rec, AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
    assert line == '127.0.0.1:5 - "GET /api/conversations?key=*** HTTP/1.1" 401 Unauthorized'


def test_a_line_that_cannot_be_checked_is_withheld_not_printed() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise ValueError(API_KEY)

    line = shown(record("value %s", Hostile()))
    assert "withheld" in line and API_KEY not in line


def test_uvicorns_refusal_line_is_dropped_and_the_accepted_one_kept() -> None:
    drop = DenialLines()
    assert not drop.filter(record(DENIAL_FORMAT, "127.0.0.1:5", "/live", 401))
    assert not drop.filter(record(REJECTED_FORMAT, 401, "Unauthorized"))
    assert drop.filter(record(REJECTED_FORMAT, 500, "Internal Server Error"))
    assert drop.filter(record('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/live"))


def test_install_is_idempotent_and_collects_persona_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = logging.StreamHandler()
    logger = logging.getLogger("tests.web_logs.install")
    logger.addHandler(handler)
    try:
        install_log_filters()
        install_log_filters()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)
    settings = make_settings(tmp_path, callback_token=f"{CALLBACK_TOKEN}, older-token-1")
    personas = load_checked_personas(settings)
    storyteller = personas["storyteller"]
    brain = storyteller.brain.model_copy(update={"api_key_env": "STORY_KEY"})
    monkeypatch.setenv("STORY_KEY", "sk-story-Y7u3")
    personas["storyteller"] = storyteller.model_copy(update={"brain": brain})
    found = configured_secrets(settings, personas)
    assert {CALLBACK_TOKEN, "older-token-1", "sk-story-Y7u3", "sk-upstream-secret"} <= set(found)


@pytest.fixture
def fakes() -> Iterator[tuple[FakeTavus, LoopbackServer, FakeUpstream, LoopbackServer]]:
    tavus = FakeTavus(api_key=TAVUS_KEY)
    upstream = FakeUpstream()
    with LoopbackServer(tavus.app) as tavus_server, LoopbackServer(upstream) as upstream_server:
        tavus.url = tavus_server.url
        yield tavus, tavus_server, upstream, upstream_server


async def _wait_ended(http: httpx.AsyncClient, cid: str) -> str | None:
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        got = await http.get(f"/api/conversations/{cid}", headers=AUTH)
        if got.status_code == 200:
            status = got.json()["conversation"]["status"]
            if status == "ended":
                break
        await asyncio.sleep(0.2)
    return status


@pytest.mark.process
@pytest.mark.slow
async def test_no_secret_in_the_server_log(
    tmp_path: Path, fakes: tuple[FakeTavus, LoopbackServer, FakeUpstream, LoopbackServer]
) -> None:
    tavus, _, upstream, upstream_server = fakes
    server = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        token=CALLBACK_TOKEN,
        env={
            "CVI_API_KEYS": f"{API_KEY},{SECOND_KEY}",
            "CVI_LOCAL_ROOMS": "1",  # the simulation meets in a local room
            "CVI_LOG_LEVEL": "debug",
            "CVI_UPSTREAM_BASE_URL": upstream_server.url + "/v1",
            "CVI_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "CVI_UPSTREAM_FIRST_TOKEN_TIMEOUT": "2",
            "TAVUS_API_KEY": TAVUS_KEY,
            "TAVUS_API_URL": tavus.url,
            "ARGIL_API_KEY": ARGIL_KEY,
            "ARGIL_API_URL": f"http://127.0.0.1:{free_port()}/v1",  # down
            "JOGG_WEBHOOK_SECRET": JOGG_SECRET,
        },
    )
    server.start()
    try:
        await _drive(server, upstream, upstream_server)
    finally:
        server.stop()
    log = server.log_text()
    assert "ws" in log.lower() or "WebSocket" in log  # the feed was logged at all
    assert not leaks(log, SECRETS), json.dumps(leaks(log, SECRETS), indent=1)[:4000]


async def _drive(server: ServerProcess, upstream: FakeUpstream, upstream_server: Any) -> None:
    ws_url = server.url.replace("http://", "ws://")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        # Tavus: a conversation created there (our callback URL, with its token, in the body).
        created = await http.post(
            "/api/conversations", json={"persona": "echo", "bot": False}, headers=AUTH
        )
        assert created.status_code == 201, created.text
        cid = created.json()["conversation"]["id"]

        # Every callback route: Tavus (token in the query; the echoed webhook_url has it too).
        joined = load_fixture("callback_replica_joined.json")
        joined["conversation_id"] = cid
        joined["webhook_url"] = f"{server.url}/callbacks/tavus?token={CALLBACK_TOKEN}"
        r = await http.post("/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=joined)
        assert r.status_code == 200, r.text
        r = await http.post("/callbacks/tavus", params={"token": WRONG_KEY}, json=joined)
        assert r.status_code == 401
        argil = load_fixture("argil_webhook_video_success.json")
        r = await http.post("/callbacks/argil", params={"token": CALLBACK_TOKEN}, json=argil)
        assert r.status_code < 500, r.text
        r = await http.post(f"/callbacks/argil/{CALLBACK_TOKEN}", json=argil)
        assert r.status_code < 500, r.text
        r = await http.post(f"/callbacks/argil/{WRONG_KEY}", json=argil)
        assert r.status_code == 401
        jogg = json.dumps(load_fixture("jogg_webhook_video_success.json")).encode()
        sig = signature(JOGG_SECRET, jogg)
        r = await http.post(
            "/callbacks/jogg",
            content=jogg,
            headers={"content-type": "application/json", "X-Webhook-Signature": sig},
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            "/callbacks/jogg",
            content=jogg + b" ",
            headers={"content-type": "application/json", "X-Webhook-Signature": sig},
        )
        assert r.status_code == 401
        r = await http.post("/callbacks/jogg", params={"token": CALLBACK_TOKEN}, content=jogg)
        assert r.status_code < 500, r.text

        # The live feed: accepted with ?key= and with a subprotocol, refused with a wrong key.
        async with connect(f"{ws_url}/api/conversations/{cid}/live?key={API_KEY}") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "event"
        async with connect(
            f"{ws_url}/api/conversations/{cid}/live",
            subprotocols=["cvi-agent", f"bearer.{SECOND_KEY}"],  # type: ignore[list-item]
        ) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "event"
        for url in (
            f"{ws_url}/api/conversations/{cid}/live?key={WRONG_KEY}",
            f"{ws_url}/api/conversations/missing/live?key={API_KEY}",
        ):
            with pytest.raises(InvalidStatus):
                async with connect(url):
                    pass
        r = await http.get("/api/conversations", params={"key": WRONG_KEY})
        assert r.status_code == 401

        # A simulation: its callbacks go out with ?token= from inside the server.
        sim = await http.post(
            "/api/simulations", json={"linger": 0, "words_per_second": 80}, headers=AUTH
        )
        assert sim.status_code == 202, sim.text
        assert await _wait_ended(http, sim.json()["conversation_id"]) == "ended"

        # The upstream: one answer, one refusal that quotes our key back, then down.
        chat = {"model": "storyteller", "messages": [{"role": "user", "content": "Hi"}]}
        r = await http.post("/v1/chat/completions", json=chat, headers=AUTH)
        assert r.status_code == 200, r.text
        upstream.push(
            Plan(
                status=401,
                error_body={"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}"}},
            )
        )
        r = await http.post("/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH)
        assert r.status_code < 500 or r.status_code in (502, 503)
        upstream_server.stop()
        r = await http.post("/v1/chat/completions", json=chat, headers=AUTH)
        assert r.status_code < 500 or r.status_code in (502, 503)


@pytest.mark.process
def test_no_secret_in_the_log_of_uvicorn_run_on_the_factory(tmp_path: Path) -> None:
    """`uvicorn cvi_agent.app:create_app --factory` configures logging itself (access log on):
    the app installs the redaction on uvicorn's handlers when it is created."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "CVI_API_KEYS": API_KEY,
        "CVI_CALLBACK_TOKEN": CALLBACK_TOKEN,
        "CVI_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        "CVI_VAR_DIR": str(tmp_path / "var"),
        "CVI_PERSONAS_DIR": str(PERSONAS),
        "CVI_VIDEO_POLL_INTERVAL": "0",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "uvicorn.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "cvi_agent.app:create_app",
                "--factory",
                "--port",
                str(port),
                "--log-level",
                "debug",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        joined = load_fixture("callback_replica_joined.json")
        assert (
            httpx.post(f"{url}/callbacks/tavus?token={CALLBACK_TOKEN}", json=joined).status_code
            == 200
        )
        assert httpx.get(f"{url}/api/conversations?key={WRONG_KEY}").status_code == 401
        cid = joined["conversation_id"]

        async def feed() -> None:
            ws_url = url.replace("http://", "ws://")
            async with connect(f"{ws_url}/api/conversations/{cid}/live?key={API_KEY}") as ws:
                await asyncio.wait_for(ws.recv(), 10)
            with pytest.raises(InvalidStatus):
                async with connect(f"{ws_url}/api/conversations/{cid}/live?key={WRONG_KEY}"):
                    pass

        asyncio.run(feed())
    finally:
        proc.terminate()
        proc.wait(15)
    log = log_path.read_text(errors="replace")
    assert "/callbacks/tavus" in log  # the access log is on
    assert not leaks(log, SECRETS), json.dumps(leaks(log, SECRETS), indent=1)[:4000]


@pytest.mark.process
def test_no_secret_in_the_bot_commands_output(tmp_path: Path) -> None:
    """`cvi-agent bot` that cannot join: its log lines and its final error name the room URL,
    whose meeting token (and any key in it) is masked."""
    meeting = "meeting-token-K9s2Df7Gh4"
    url = f"ws://127.0.0.1:{free_port()}/room?t={meeting}&key={API_KEY}"
    env = {
        "PATH": "/usr/bin:/bin",
        "CVI_API_KEYS": API_KEY,
        "CVI_LOCAL_ROOMS": "1",  # the room is a local one on loopback
        "CVI_LOG_LEVEL": "debug",
        "CVI_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        "CVI_VAR_DIR": str(tmp_path / "var"),
        "CVI_PERSONAS_DIR": str(PERSONAS),
    }
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cvi_agent", "bot", "--conversation-url", url),
            *("--conversation-id", "c-bot", "--meeting-token", meeting, "--join-timeout", "1"),
            "-v",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
    )
    out = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 1, out
    assert "could not join" in out and "t=***" in out
    assert not leaks(out, (*SECRETS, meeting)), json.dumps(leaks(out, (*SECRETS, meeting)))
