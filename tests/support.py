"""Constants and helpers the tests share: a plain module, so tests import it by name (pytest's
conftest.py holds only fixtures and is never imported).

Everything a test reads lives in this repository: the shipped personas and `tests/fixtures/`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from cvi_agent.config import Settings
from cvi_agent.devtools.fakes.server import LoopbackServer

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ROOT / "personas"
# Example payloads in the documented wire formats (Tavus callbacks and room events, the chat
# request Tavus sends, Argil and JoggAI answers and webhooks).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
API_KEY = "test-key-0123456789"
TAVUS_KEY = "tavus-test-key-0123456789"
CALLBACK_TOKEN = "cb-token-test-0123456789"

# Where the integration tests find PostgreSQL and Redis. Read once, at import: the autouse
# fixture that clears the application's variables leaves these CVI_TEST_* ones alone.
PG_ADMIN_URL = os.environ.get("CVI_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("CVI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# What the application reads from the environment (cvi_agent/config.py, the video providers);
# a developer's shell must not change a test's result through them.
APP_ENV_PREFIXES = ("CVI_", "TAVUS_", "ARGIL_", "JOGG_")
APP_ENV_NAMES = ("HOST", "PORT")
TEST_ENV_PREFIX = "CVI_TEST_"

ServerFactory = Callable[..., LoopbackServer]

# The database kinds a store test runs on; `-m "not postgres"` leaves out the PostgreSQL runs.
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def load_fixture(name: str) -> dict[str, Any]:
    """One JSON payload from `tests/fixtures/`, parsed."""
    value: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return value


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a child process (`cvi-agent …`): this one's, without any variable
    the application reads (`CVI_TEST_*` included), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(APP_ENV_PREFIXES) and k not in APP_ENV_NAMES
    }
    env.update(extra)
    return env


def clear_app_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable the application reads, keeping the suite's own `CVI_TEST_*`."""
    for name in list(os.environ):
        if name.startswith(TEST_ENV_PREFIX):
            continue
        if name.startswith(APP_ENV_PREFIXES) or name in APP_ENV_NAMES:
            monkeypatch.delenv(name)


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


async def create_pg_database() -> tuple[str, str]:
    """A fresh, empty PostgreSQL database: (name, SQLAlchemy URL).

    Fails loudly when PostgreSQL is not running: these tests must not silently skip in CI.
    """
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


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """Await `check` every 50 ms until it returns something truthy, and return that; fail
    after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s")
        await asyncio.sleep(0.05)


async def wait_until(condition: Any, within: float = 3.0) -> None:
    """Poll `condition` every 10 ms until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
