"""`GET /readyz` (cvi_agent/doctor/readiness.py) on the real server process: 200 while the
database (and Redis when configured) answer, 503 naming the failing part once one is away;
`/healthz` stays 200 (liveness). "Away" is real: the server reaches PostgreSQL or Redis through
a TCP relay process, which the test kills."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from cvi_agent.devtools.fakes.server import free_port
from tests.procs import ServerProcess
from tests.support import REDIS_TEST_URL, create_pg_database, drop_pg_database

pytestmark = pytest.mark.process


class Relay:
    """`python -m cvi_agent.devtools.fakes.relay` to `target` on a free port."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cvi_agent.devtools.fakes.relay",
                "--port",
                str(self.port),
                "--to",
                target,
            ]
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise AssertionError("the relay did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        relay.kill()


@pytest.fixture
async def pg_name() -> AsyncIterator[str]:
    name, _ = await create_pg_database()
    yield name
    await drop_pg_database(name)


def _ready(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=10)  # no key: probes send none


@pytest.mark.postgres
def test_readyz_follows_postgresql(tmp_path: Path, pg_name: str, relays: list[Relay]) -> None:
    relay = Relay("127.0.0.1:5432")
    relays.append(relay)
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/{pg_name}"
    server = ServerProcess(tmp_path, url).start()
    try:
        up = _ready(server)
        assert up.status_code == 200
        assert up.json() == {"status": "ready", "database": "ok", "redis": "not configured"}
        relay.kill()
        down = _ready(server)
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "not ready" and body["database"].startswith("failing: ")
        assert "127.0.0.1" not in down.text  # the cause's details are in the log only
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
    assert "readiness: database failing" in server.log_text()


@pytest.mark.redis
def test_readyz_follows_redis(tmp_path: Path, relays: list[Relay]) -> None:
    host, _, rest = REDIS_TEST_URL.removeprefix("redis://").partition(":")
    port, _, db = rest.partition("/")
    relay = Relay(f"{host}:{port}")
    relays.append(relay)
    server = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        env={"CVI_REDIS_URL": f"redis://127.0.0.1:{relay.port}/{db or 0}"},
    ).start()
    try:
        up = _ready(server)
        assert up.status_code == 200 and up.json()["redis"] == "ok"
        relay.kill()
        down = _ready(server)
        assert down.status_code == 503
        assert down.json()["database"] == "ok" and down.json()["redis"].startswith("failing: ")
    finally:
        server.stop()


def test_a_dead_redis_at_start_is_one_line(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        env={"CVI_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
    )
    with pytest.raises(AssertionError, match="exited at start"):
        server.start()
    out = server.log_text()
    assert "Traceback" not in out
    assert "cvi-agent: cannot start: redis: cannot reach redis://127.0.0.1:" in out
