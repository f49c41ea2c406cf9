"""The poller: finishes every provider's videos without webhooks, backs off, bounds its
concurrency, gives up after a max age, survives provider errors, and runs in the app lifespan."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.store import SqlStore, VideoRecord, open_store
from cvi_agent.videos.base import VideoEvent
from cvi_agent.videos.poller import VideoPoller
from cvi_agent.videos.service import VideoService
from tests.support import ServerFactory
from tests.videos_support import (
    FAST_RETRY,
    fake_providers,
    provider_settings,
    video_settings,
    wait_until,
)


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.05, deliver_webhooks=False) as f:
        yield f


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqlStore]:
    """SQLite; the main path runs on PostgreSQL too (it asks for `store`)."""
    s = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'poller.db'}")
    yield s
    await s.aclose()


@pytest.fixture
async def service(
    fake: FakeVideoProviders, db: SqlStore, tmp_path: Path
) -> AsyncIterator[VideoService]:
    svc = VideoService(video_settings(tmp_path, fake), db, retry=FAST_RETRY)
    yield svc
    await svc.aclose()


async def create_all(service: VideoService, conversation_id: str = "c1") -> list[VideoRecord]:
    return [
        await service.create(
            "tavus", avatar="r79e1c033f", script="Hi.", conversation_id=conversation_id
        ),
        await service.create(
            "argil", avatar="a1", voice="v1", script="Hi.", conversation_id=conversation_id
        ),
        await service.create(
            "jogg", avatar="127", voice="en", script="Hi.", conversation_id=conversation_id
        ),
    ]


async def run_until_done(poller: VideoPoller, store: SqlStore, within: float = 5.0) -> None:
    async def done() -> bool:
        await poller.poll_once()
        return not await store.list_videos(statuses=("queued", "rendering"))

    await wait_until(done, within=within, step=0.03)


async def test_every_provider_is_finished_without_webhooks(
    fake: FakeVideoProviders, store: SqlStore, tmp_path: Path
) -> None:
    service = VideoService(video_settings(tmp_path, fake), store, retry=FAST_RETRY)
    created = await create_all(service)
    assert {v.status for v in created} <= {"queued", "rendering"}
    poller = VideoPoller(service, interval=0.02, max_interval=0.05)
    await run_until_done(poller, store)
    videos = await store.list_videos("c1")
    assert sorted(v.provider for v in videos) == ["argil", "jogg", "tavus"]
    assert all(v.status == "ready" and v.url and v.url.endswith(".mp4") for v in videos)
    assert all(v.conversation_id == "c1" and v.script == "Hi." for v in videos)
    # One row per status observed, per video; nothing duplicated.
    rows = await store.list_events("c1", source="video")
    keys = [r.dedupe_key for r in rows]
    assert len(keys) == len(set(keys))
    assert {r.payload["status"] for r in rows if r.kind == "video.status"} >= {"ready"}
    before = poller.polls
    assert await poller.poll_once() == 0 and poller.polls == before  # nothing pending
    await service.aclose()


async def test_a_failed_render_ends_failed(service: VideoService, db: SqlStore) -> None:
    await service.create(
        "jogg", avatar="127", voice="en", script="Please FAIL.", conversation_id="c1"
    )
    await run_until_done(VideoPoller(service, interval=0.02, max_interval=0.05), db)
    [video] = await db.list_videos("c1")
    assert video.status == "failed" and video.error and video.url is None


async def test_each_video_backs_off(service: VideoService, db: SqlStore) -> None:
    await db.upsert_video(VideoRecord("tavus", "nope", "queued"))  # unknown: 404 each time
    now = [1000.0]
    poller = VideoPoller(service, interval=10, max_interval=40, clock=lambda: now[0])
    polled_at = []
    for _ in range(120):
        if await poller.poll_once():
            polled_at.append(now[0])
        now[0] += 1
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert gaps[:3] == [10, 20, 40] and set(gaps[3:]) == {40}


async def test_concurrency_is_bounded(
    fake: FakeVideoProviders, service: VideoService, db: SqlStore
) -> None:
    for i in range(6):
        await db.upsert_video(VideoRecord("tavus", f"missing{i}", "rendering"))
    fake.fail_next("tavus", "GET", "/v2/videos/", status=None, delay=0.15, times=6)
    poller = VideoPoller(service, interval=0.01, concurrency=2)
    started = time.monotonic()
    assert await poller.poll_once() == 6
    assert time.monotonic() - started >= 0.44  # 6 slow GETs, 2 at a time: 3 rounds


async def test_provider_errors_do_not_stop_it(
    fake: FakeVideoProviders, service: VideoService, db: SqlStore
) -> None:
    [video] = [await service.create("argil", avatar="a1", voice="v1", script="Hi.")]
    fake.fail_next("argil", "GET", "/videos/", status=500, times=8)
    poller = VideoPoller(service, interval=0.02, max_interval=0.05)
    await poller.poll_once()
    assert (await db.get_video("argil", video.video_id)).status == "rendering"  # type: ignore[union-attr]
    await run_until_done(poller, db)
    assert (await db.get_video("argil", video.video_id)).status == "ready"  # type: ignore[union-attr]


async def test_unconfigured_providers_are_skipped(db: SqlStore, tmp_path: Path) -> None:
    settings = video_settings(tmp_path, None, jogg_api_key="", tavus_api_key="", argil_api_key="")
    svc = VideoService(settings, db)
    await db.upsert_video(VideoRecord("jogg", "v1", "queued"))
    poller = VideoPoller(svc, interval=0.01)
    assert await poller.poll_once() == 0 and poller.polls == 0
    await svc.aclose()


async def test_gives_up_after_max_age_but_a_late_result_still_counts(
    service: VideoService, db: SqlStore
) -> None:
    old = time.time() - 7200
    await db.upsert_video(
        VideoRecord("tavus", "stuck", "rendering", conversation_id="c1", created_at=old)
    )
    poller = VideoPoller(service, interval=0.01, max_age=3600)
    await poller.poll_once()
    video = await db.get_video("tavus", "stuck")
    assert video is not None and video.status == "failed"
    assert video.error == "no result from tavus after 1 hour"
    assert poller.polls == 0  # gave up without asking
    late = VideoEvent("tavus", "stuck", "ready", url="https://x.test/stuck.mp4", kind="video.ready")
    await service.record(late, "tavus:stuck:ready")
    video = await db.get_video("tavus", "stuck")
    assert video is not None and video.status == "ready"


async def test_the_app_lifespan_runs_it(serve: ServerFactory, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'life.db'}"
    with fake_providers(stage_seconds=0.05, deliver_webhooks=False) as fake:
        db = await open_store(db_url)
        try:
            svc = VideoService(video_settings(tmp_path, fake), db, retry=FAST_RETRY)
            video = await svc.create(
                "jogg", avatar="127", voice="en", script="Hi.", conversation_id="c7"
            )
            await svc.aclose()
            serve(None, **provider_settings(fake), database_url=db_url, video_poll_interval=0.05)

            async def ready() -> bool:
                found = await db.get_video("jogg", video.video_id)
                return found is not None and found.status == "ready"

            await wait_until(ready, within=10)
            [listed] = await db.list_videos("c7")
            assert listed.url and listed.url.endswith(".mp4")
        finally:
            await db.aclose()
