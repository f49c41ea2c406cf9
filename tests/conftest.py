"""Shared fixtures: real uvicorn servers on loopback, the fake upstream, the real openai SDK."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cvi_agent.app import create_app
from cvi_agent.config import Settings
from cvi_agent.fakes.server import LoopbackServer
from cvi_agent.fakes.upstream import FakeUpstream

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
