"""Tavus videos: the client against the fake API, callback parsing, and
`ingest_tavus_video_callback` (directly on SQLite and PostgreSQL, and through a small route)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.store import SqlStore, VideoRecord, open_store
from cvi_agent.videos.base import CreateVideo, ProviderError, parse_time
from cvi_agent.videos.tavus import TavusVideos, is_video_callback, parse_callback
from cvi_agent.videos.webhooks import NotAVideoCallback, ingest_tavus_video_callback
from tests.support import load_fixture
from tests.videos_support import FAST_RETRY, fake_providers, fake_url, poll_video


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.1) as f:
        yield f


@pytest.fixture
async def tavus(fake: FakeVideoProviders) -> AsyncIterator[TavusVideos]:
    client = TavusVideos("fake-video-key", fake_url(fake) + "/tavus", retry=FAST_RETRY)
    yield client
    await client.aclose()


async def test_create_and_poll_to_ready(fake: FakeVideoProviders, tavus: TavusVideos) -> None:
    created = await tavus.create_video(
        CreateVideo(
            avatar="r79e1c033f",
            script="Hello there.",
            title="Recap",
            callback_url="https://agent.example.test/callbacks/tavus?token=t",
            conversation_id="c1",
        )
    )
    assert created.status == "queued" and created.conversation_id == "c1"
    [body] = fake.creates["tavus"]
    assert body == {
        "replica_id": "r79e1c033f",
        "script": "Hello there.",
        "video_name": "Recap",
        "callback_url": "https://agent.example.test/callbacks/tavus?token=t",
    }
    event = (await poll_video(lambda: tavus.get_video(created.video_id), "ready"))[-1]
    assert event.url and event.url.endswith(".mp4")
    assert fake.served[("tavus", created.video_id)] == ["queued", "generating", "ready"]


async def test_audio_instead_of_script(fake: FakeVideoProviders, tavus: TavusVideos) -> None:
    await tavus.create_video(CreateVideo(avatar="r1", audio_url="https://x.test/a.mp3"))
    assert fake.creates["tavus"][0]["audio_url"] == "https://x.test/a.mp3"
    assert "script" not in fake.creates["tavus"][0]
    with pytest.raises(ValueError):
        await tavus.create_video(CreateVideo(avatar="r1", script="a", audio_url="b"))


async def test_429_is_retried_and_errors_carry_the_message(
    fake: FakeVideoProviders, tavus: TavusVideos
) -> None:
    fake.fail_next("tavus", "POST", "/v2/videos", status=429, times=2)
    await tavus.create_video(CreateVideo(avatar="r1", script="Hi."))
    assert fake.count("tavus", "POST", "/v2/videos") == 3 and len(fake.creates["tavus"]) == 1
    fake.fail_next("tavus", "POST", "/v2/videos", status=400, body={"error": "Invalid replica"})
    with pytest.raises(ProviderError) as err:
        await tavus.create_video(CreateVideo(avatar="r1", script="Hi."))
    assert err.value.status == 400 and "Invalid replica" in str(err.value)
    bad = TavusVideos("nope", fake_url(fake) + "/tavus", retry=FAST_RETRY)
    try:
        with pytest.raises(ProviderError) as err:
            await bad.get_video("x")
        assert err.value.status == 401 and "Invalid access token" in str(err.value)
    finally:
        await bad.aclose()


async def test_replicas_are_the_avatars(tavus: TavusVideos) -> None:
    assert "r79e1c033f" in [a.id for a in await tavus.list_avatars()]
    assert await tavus.list_voices() == []


def test_callback_fixture_normalizes() -> None:
    payload = load_fixture("callback_video_ready.json")
    assert is_video_callback(payload)
    assert not is_video_callback(load_fixture("callback_shutdown.json"))
    delivery = parse_callback(payload)
    assert delivery.dedupe_key == "tavus:1e30440cf9:ready" and delivery.event is not None
    assert delivery.event.status == "ready"
    assert delivery.event.url == "https://stream.example.test/high.mp4?download=1e30440cf9"
    assert delivery.event.occurred_at == parse_time("2024-08-28T15:29:19.802670Z")
    error = parse_callback({"video_id": "v", "status": "error", "status_details": "Bad audio"})
    assert error.event is not None and error.event.status == "failed"
    assert error.event.error == "Bad audio"


def test_dates_parse_leniently() -> None:
    expected = 1724858860.824457
    assert parse_time("2024-08-28 15:27:40.824457") == pytest.approx(expected)
    assert parse_time("2024-08-28T15:27:40.824457Z") == pytest.approx(expected)
    assert parse_time("2024-08-28T17:27:40.824457+02:00") == pytest.approx(expected)
    assert parse_time(1732806631) == 1732806631.0
    assert parse_time(1732806631000) == 1732806631.0
    assert parse_time("Wed, 28 Aug 2024 15:27:40 GMT") == pytest.approx(1724858860)
    assert parse_time("not a date") is None and parse_time(None) is None


# -- ingestion ------------------------------------------------------------------------------------


def _status(payload: dict[str, Any], status: str) -> dict[str, Any]:
    return {**payload, "status": status}


async def test_ingest_twice_and_out_of_order_keeps_one_row_per_status(store: SqlStore) -> None:
    ready = load_fixture("callback_video_ready.json")
    # We created this video during conversation c-42: the callback itself does not say so.
    await store.upsert_video(
        VideoRecord("tavus", "1e30440cf9", "queued", conversation_id="c-42", script="Hello")
    )
    for payload in (ready, _status(ready, "generating"), ready, _status(ready, "generating")):
        event = await ingest_tavus_video_callback(store, payload)
        assert event.conversation_id == "c-42"
    events = await store.list_events("c-42", source="video")
    assert sorted(e.kind for e in events) == ["video.generating", "video.ready"]
    video = await store.get_video("tavus", "1e30440cf9")
    assert video is not None and video.status == "ready" and video.script == "Hello"
    assert video.url == "https://stream.example.test/high.mp4?download=1e30440cf9"
    [listed] = await store.list_videos("c-42")
    assert listed.video_id == "1e30440cf9" and listed.status == "ready"
    # Ready after a live conversation with on_ready unset: nothing announced.
    assert await store.count_events("c-42", source="video") == 2


async def test_ingest_refuses_other_payloads(store: SqlStore) -> None:
    with pytest.raises(NotAVideoCallback):
        await ingest_tavus_video_callback(store, load_fixture("callback_shutdown.json"))
    assert await store.count_events() == 0


async def test_ingest_through_a_route(tmp_path: Path) -> None:
    """How the Tavus callback route uses it: token checked there, stored before the 200."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'route.db'}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = await open_store(url)  # opened on the server's own loop
        yield
        await app.state.store.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/callbacks/tavus")
    async def callback(request: Request, payload: dict[str, Any]) -> dict[str, Any]:
        event = await ingest_tavus_video_callback(request.app.state.store, payload)
        return {"received": True, "status": event.status}

    with LoopbackServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for _ in range(2):
                response = await http.post(
                    "/callbacks/tavus", json=load_fixture("callback_video_ready.json")
                )
                assert response.status_code == 200 and response.json()["status"] == "ready"
    db = await open_store(url)
    try:
        assert await db.count_events(source="video") == 1
        video = await db.get_video("tavus", "1e30440cf9")
        assert video is not None and video.status == "ready" and video.conversation_id is None
    finally:
        await db.aclose()
