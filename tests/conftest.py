"""Shared fixtures: real uvicorn servers on loopback, the fake upstream, the real openai SDK."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cvi_agent.app import create_app
from cvi_agent.config import Settings
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.store import SqlStore, open_store

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ROOT / "personas"
FIXTURES = ROOT.parent / "shared" / "fixtures"
if not FIXTURES.is_dir():
    FIXTURES = ROOT / "tests" / "fixtures"
API_KEY = "test-key-0123456789"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with LoopbackServer(fake) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


def make_settings(
    tmp_path: Path, upstream_url: str = "http://127.0.0.1:9", **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "api_keys_raw": API_KEY,
        "personas_dir": PERSONAS,
        "upstream_base_url": upstream_url + "/v1",
        "upstream_api_key": "sk-upstream-secret",
        "var_dir": tmp_path / "var",
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
    }
    values.update(overrides)
    return Settings(**values)


ServerFactory = Callable[..., LoopbackServer]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start the app on loopback with settings overrides; stopped at the end of the test."""
    started: list[LoopbackServer] = []

    def start(upstream: FakeUpstream | None = None, **overrides: Any) -> LoopbackServer:
        url = getattr(upstream, "url", "http://127.0.0.1:9")
        settings = make_settings(tmp_path, url, **overrides)
        server = LoopbackServer(create_app(settings)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(serve: ServerFactory, upstream: FakeUpstream) -> LoopbackServer:
    return serve(upstream)


@pytest.fixture
async def client(server: LoopbackServer) -> Any:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


PG_ADMIN_URL = os.environ.get("CVI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("CVI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def create_pg_database() -> tuple[str, str]:
    """A fresh, empty PostgreSQL database: (name, SQLAlchemy URL).

    Fails loudly when PostgreSQL is not running: these tests must not silently skip in CI.
    """
    import asyncpg  # type: ignore[import-untyped]

    name = "cvi_test_" + uuid.uuid4().hex[:12]
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN_URL} ({exc}); start it, see README")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    host_part = PG_ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]
    return name, f"postgresql+asyncpg://{host_part}/{name}"


async def drop_pg_database(name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fresh_database_url(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database URL: SQLite under tmp_path, or a new PostgreSQL database (dropped
    afterwards, even when the test failed)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}"
        return
    name, url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The test runs once on SQLite and once on PostgreSQL."""
    async for url in fresh_database_url(request.param, tmp_path):
        yield url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database URL for one test (dropped afterwards)."""
    name, url = await create_pg_database()
    yield url
    await drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """The SQL store on SQLite and on the real PostgreSQL of this machine."""
    name = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        name, url = await create_pg_database()
    s = await open_store(url)
    yield s
    await s.aclose()
    if name is not None:
        await drop_pg_database(name)


TAVUS_KEY = "tavus-test-key-0123456789"


@pytest.fixture
def fake_tavus() -> Iterator[Any]:
    """The fake Tavus REST API on loopback (`cvi_agent.devtools.fakes.tavus.FakeTavus`), `.url` set."""
    from cvi_agent.devtools.fakes.tavus import FakeTavus

    fake = FakeTavus(api_key=TAVUS_KEY)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake
