"""Helpers shared by the avatar-video tests: the fake providers on loopback, settings, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cvi_agent.config import Settings
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.videos import DEFAULT_KEY, FakeVideoProviders
from cvi_agent.videos.base import RetryPolicy, VideoEvent
from tests.support import make_settings

# Fast, still bounded, backoff so retry tests take milliseconds.
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
CALLBACK_TOKEN = "cb-token-0123456789"


@contextmanager
def fake_providers(**kwargs: Any) -> Iterator[FakeVideoProviders]:
    """Fake Tavus/Argil/JoggAI on a real uvicorn; `fake.url` is its base URL."""
    fake = FakeVideoProviders(**kwargs)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


def fake_url(fake: FakeVideoProviders) -> str:
    url: str = fake.url  # type: ignore[attr-defined]
    return url


def provider_settings(fake: FakeVideoProviders | None) -> dict[str, Any]:
    """Settings overrides that point every provider client at the fake (or at a dead port)."""
    url = fake_url(fake) if fake is not None else "http://127.0.0.1:9"
    return {
        "tavus_api_url": f"{url}/tavus",
        "tavus_api_key": DEFAULT_KEY,
        "argil_api_url": f"{url}/argil/v1",
        "argil_api_key": DEFAULT_KEY,
        "jogg_api_url": f"{url}/jogg/v2",
        "jogg_api_key": DEFAULT_KEY,
    }


def video_settings(tmp_path: Path, fake: FakeVideoProviders | None, **overrides: Any) -> Settings:
    values = provider_settings(fake)
    values.update(overrides)
    return make_settings(tmp_path, **values)


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float = 5.0, step: float = 0.02
) -> None:
    """Poll `check` until it is true; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(step)


async def poll_video(
    get: Callable[[], Awaitable[VideoEvent]], until: str, within: float = 3.0
) -> list[VideoEvent]:
    """Every event `get` returned until one has status `until` (bounded by `within` seconds)."""
    seen: list[VideoEvent] = []

    async def reached() -> bool:
        seen.append(await get())
        return seen[-1].status == until

    await wait_until(reached, within=within)
    return seen
