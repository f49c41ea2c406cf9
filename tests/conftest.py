"""Shared fixtures: real uvicorn servers on loopback, the fake upstream, the real openai SDK.

Only fixtures live here; constants and helpers are in `tests/support.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cvi_agent.app import create_app
from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.store import SqlStore, open_store
from tests.support import (
    API_KEY,
    CALLBACK_TOKEN,
    DATABASES,
    PERSONAS,
    TAVUS_KEY,
    ServerFactory,
    clear_app_environment,
    create_pg_database,
    drop_pg_database,
    fresh_database_url,
    make_settings,
)


@pytest.fixture(scope="session", autouse=True)
def session_environment() -> Iterator[None]:
    """No CVI_*, TAVUS_*, ARGIL_*, JOGG_*, HOST or PORT from the developer's shell, already for
    module-scoped fixtures (they build Settings before any per-test fixture runs)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        clear_app_environment(monkeypatch)
        yield


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, again before every test: code under test may write os.environ itself
    (`serve --workers` passes its generated key on that way), and no test may see another's."""
    clear_app_environment(monkeypatch)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with LoopbackServer(fake) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start the app on loopback with settings overrides; stopped at the end of the test."""
    started: list[LoopbackServer] = []

    def start(upstream: FakeUpstream | None = None, **overrides: Any) -> LoopbackServer:
        url = getattr(upstream, "url", "http://127.0.0.1:9")
        settings = make_settings(tmp_path, url, **overrides)
        server = LoopbackServer(create_app(settings), settings=settings).start()
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


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The test runs once on SQLite and once on PostgreSQL."""
    async for url in fresh_database_url(request.param, tmp_path):
        yield url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database URL for one test (dropped afterwards); a test that uses it
    carries the `postgres` mark."""
    name, url = await create_pg_database()
    yield url
    await drop_pg_database(name)


@pytest.fixture(params=DATABASES)
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


@pytest.fixture
def fake_tavus() -> Iterator[Any]:
    """The fake Tavus REST API on loopback (`cvi_agent.devtools.fakes.tavus.FakeTavus`), `.url` set."""
    fake = FakeTavus(api_key=TAVUS_KEY)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def app_defaults() -> dict[str, Any]:
    """Settings every `app_server` of a test module starts from; a module overrides this
    fixture to change them for all its servers."""
    return {}


@pytest.fixture
def app_server(
    tmp_path: Path, fake_tavus: Any, app_defaults: dict[str, Any]
) -> Iterator[ServerFactory]:
    """Start our app on loopback (as many as a test asks for, all stopped afterwards), talking
    to the fake Tavus, its CVI_PUBLIC_URL its own address (so callbacks come home), its bots the
    recording test bot; `own_database=True` gives each server its own SQLite file. Keyword
    arguments override settings."""
    started: list[LoopbackServer] = []

    def start(**overrides: Any) -> LoopbackServer:
        port = free_port()
        values: dict[str, Any] = {
            "public_url": f"http://127.0.0.1:{port}",
            "callback_token": CALLBACK_TOKEN,
            "tavus_api_key": TAVUS_KEY,
            "tavus_api_url": fake_tavus.url,
            "bot_factory": "tests.bots:recording_bot",
            "worker_poll_interval": 0.2,
            **app_defaults,
            **overrides,
        }
        if values.pop("own_database", False):
            values.setdefault("database_url", f"sqlite+aiosqlite:///{tmp_path / f'cvi-{port}.db'}")
        server = LoopbackServer(create_app(make_settings(tmp_path, **values)), port=port).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tavus_cli_env(monkeypatch: pytest.MonkeyPatch, fake_tavus: Any, tmp_path: Path) -> None:
    """The environment the CLI reads, pointing at the fake Tavus and our test keys."""
    monkeypatch.setenv("TAVUS_API_KEY", TAVUS_KEY)
    monkeypatch.setenv("TAVUS_API_URL", fake_tavus.url)
    monkeypatch.setenv("CVI_API_KEYS", API_KEY)
    monkeypatch.setenv("CVI_PERSONAS_DIR", str(PERSONAS))
    monkeypatch.setenv("CVI_PUBLIC_URL", "https://agent.example")
    monkeypatch.setenv("CVI_VAR_DIR", str(tmp_path / "var"))
