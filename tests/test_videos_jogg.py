"""JoggAI: the envelope (HTTP status AND code), retries, the 20 POST/min limiter, signatures,
webhook parsing and endpoint registration, against the fake API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.videos.base import CreateVideo, RequestPacer, RetryPolicy
from cvi_agent.videos.jogg import (
    JoggError,
    JoggVideos,
    parse_callback,
    signature,
    verify_signature,
)
from tests.support import load_fixture
from tests.videos_support import FAST_RETRY, fake_providers, fake_url, poll_video


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.1) as f:
        yield f


@pytest.fixture
async def jogg(fake: FakeVideoProviders) -> AsyncIterator[JoggVideos]:
    client = JoggVideos("fake-video-key", fake_url(fake) + "/jogg/v2", retry=FAST_RETRY)
    yield client
    await client.aclose()


def request(script: str = "Hello from Jogg.") -> CreateVideo:
    return CreateVideo(avatar="127", voice="en-US-ava", script=script, title="Recap")


async def test_create_and_poll_to_completed(fake: FakeVideoProviders, jogg: JoggVideos) -> None:
    created = await jogg.create_video(request())
    assert created.status == "queued" and created.video_id.startswith("video_")
    [body] = fake.creates["jogg"]
    assert body["avatar"] == {"avatar_id": 127, "avatar_type": 0}
    assert body["voice"] == {
        "type": "script",
        "voice_id": "en-US-ava",
        "script": "Hello from Jogg.",
    }
    assert body["video_name"] == "Recap" and "webhook_url" not in body
    seen = await poll_video(lambda: jogg.get_video(created.video_id), "ready")
    assert {e.status for e in seen[:-1]} <= {"queued", "rendering"}
    event = seen[-1]
    assert event.url and event.url.endswith(".mp4")
    assert fake.served[("jogg", created.video_id)] == ["pending", "processing", "completed"]


async def test_a_failed_render_reports_its_error(jogg: JoggVideos) -> None:
    created = await jogg.create_video(request("This one will FAIL."))
    event = (await poll_video(lambda: jogg.get_video(created.video_id), "failed"))[-1]
    assert event.url is None and event.error


async def test_non_zero_code_under_http_200_is_an_error(jogg: JoggVideos) -> None:
    """The fake answers "not found" as HTTP 200 + code 10104: the code alone must fail it."""
    with pytest.raises(JoggError) as err:
        await jogg.get_video("video_missing")
    assert err.value.status == 200 and err.value.code == 10104
    assert err.value.meaning == "not found" and "not found" in str(err.value)


async def test_invalid_key_and_parameter_errors_have_their_meaning(
    fake: FakeVideoProviders,
) -> None:
    bad = JoggVideos("wrong", fake_url(fake) + "/jogg/v2", retry=FAST_RETRY)
    try:
        with pytest.raises(JoggError) as err:
            await bad.list_voices()
        assert err.value.code == 10105 and "invalid API key" in str(err.value)
    finally:
        await bad.aclose()
    good = JoggVideos("fake-video-key", fake_url(fake) + "/jogg/v2", retry=FAST_RETRY)
    try:
        fake.fail_next("jogg", "POST", "/create_video", status=200, jogg_code=18020)
        with pytest.raises(JoggError) as err:
            await good.create_video(request())
        assert err.value.code == 18020 and "no credit" in str(err.value)
        assert not err.value.retryable and fake.count("jogg", "POST") == 1
    finally:
        await good.aclose()


async def test_http_status_error_with_a_zero_code_is_still_an_error(
    fake: FakeVideoProviders, jogg: JoggVideos
) -> None:
    fake.fail_next("jogg", "GET", "/voices", status=403, body={"code": 0, "msg": "ok?"})
    with pytest.raises(JoggError) as err:
        await jogg.list_voices()
    assert err.value.status == 403


async def test_rate_limited_answers_are_retried(fake: FakeVideoProviders, jogg: JoggVideos) -> None:
    fake.fail_next("jogg", "POST", "/create_video", status=429, times=1)  # HTTP 429
    fake.fail_next("jogg", "POST", "/create_video", status=200, jogg_code=429, times=1)  # envelope
    created = await jogg.create_video(request())
    assert created.video_id
    assert fake.count("jogg", "POST", "/create_video") == 3 and len(fake.creates["jogg"]) == 1


async def test_system_error_is_retried_only_when_idempotent(
    fake: FakeVideoProviders, jogg: JoggVideos
) -> None:
    created = await jogg.create_video(request())
    fake.fail_next("jogg", "GET", "/avatar_video/", status=200, jogg_code=50000, times=2)
    assert (await jogg.get_video(created.video_id)).video_id == created.video_id
    fake.fail_next("jogg", "POST", "/create_video", status=200, jogg_code=50000)
    with pytest.raises(JoggError) as err:
        await jogg.create_video(request())
    assert err.value.code == 50000 and len(fake.creates["jogg"]) == 1


async def test_avatar_ids_must_be_integers(fake: FakeVideoProviders, jogg: JoggVideos) -> None:
    with pytest.raises(JoggError) as err:
        await jogg.create_video(CreateVideo(avatar="ava", voice="v", script="Hi."))
    assert err.value.code == 40000
    assert fake.count("jogg", "POST") == 0


async def test_client_limiter_keeps_posts_under_the_limit(fake: FakeVideoProviders) -> None:
    """3 POSTs per 0.4 s here (20/min in production): the 4th waits instead of being refused."""
    limiter = RequestPacer(3, 0.4)
    client = JoggVideos(
        "fake-video-key",
        fake_url(fake) + "/jogg/v2",
        retry=RetryPolicy(attempts=1),
        limiter=limiter,
    )
    try:
        started = time.monotonic()
        await asyncio.gather(*(client.create_video(request(f"Video {i}.")) for i in range(7)))
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    assert len(fake.creates["jogg"]) == 7
    assert elapsed >= 0.8  # 7 posts at 3 per 0.4 s need two full windows
    stamps = sorted(t for p, m, _, t in fake.requests if p == "jogg" and m == "POST")
    for i in range(len(stamps) - 3):
        assert stamps[i + 3] - stamps[i] >= 0.38  # never 4 inside one window


async def test_rate_limiter_unit() -> None:
    now = [0.0]
    limiter = RequestPacer(2, 10.0, clock=lambda: now[0])
    await limiter.acquire()
    await limiter.acquire()
    third = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not third.done()
    third.cancel()
    with pytest.raises(asyncio.CancelledError):
        await third
    now[0] = 10.5
    async with asyncio.timeout(1):
        await limiter.acquire()
    with pytest.raises(ValueError):
        RequestPacer(0, 1)


async def test_avatars_and_voices(jogg: JoggVideos) -> None:
    assert [a.id for a in await jogg.list_avatars()] == ["127"]
    assert [v.id for v in await jogg.list_voices()] == ["en-US-ava"]


async def test_register_endpoint_returns_the_secret_then_updates(
    fake: FakeVideoProviders, jogg: JoggVideos
) -> None:
    url = "https://agent.example.test/callbacks/jogg"
    endpoint, created = await jogg.register_webhook(url)
    assert created and endpoint["secret"].startswith("whsec_")
    same, created = await jogg.register_webhook(url, have_secret=True)
    assert not created and same["endpoint_id"] == endpoint["endpoint_id"]
    # Without the secret on our side, the endpoint is replaced so a new secret comes back.
    fresh, created = await jogg.register_webhook(url, have_secret=False)
    assert created and fresh["secret"] != endpoint["secret"]
    assert [e["endpoint_id"] for e in fake.jogg_endpoints.values()] == [fresh["endpoint_id"]]


# -- webhooks ------------------------------------------------------------------------------------


def test_signature_verification() -> None:
    body = json.dumps(load_fixture("jogg_webhook_video_success.json")).encode()
    good = signature("whsec_1", body)
    assert good == good.lower() and len(good) == 64
    assert verify_signature(body, good, ["whsec_1"])
    assert verify_signature(body, "sha256=" + good.upper(), ["other", "whsec_1"])
    assert not verify_signature(body, good, ["whsec_2"])
    assert not verify_signature(body + b" ", good, ["whsec_1"])
    assert not verify_signature(body, None, ["whsec_1"])
    assert not verify_signature(body, good, [])


def test_webhook_fixtures_normalize() -> None:
    ok = parse_callback(load_fixture("jogg_webhook_video_success.json"))
    assert ok.dedupe_key == "jogg:evt_123456789" and ok.event is not None
    assert ok.event.status == "ready" and ok.event.video_id == "video_123456"
    assert ok.event.url == "https://res.example.test/videos/video_123456.mp4"
    failed = parse_callback(load_fixture("jogg_webhook_video_failed.json"))
    assert failed.event is not None and failed.event.status == "failed"
    assert failed.event.error == "Video generation failed (code 50000)"
    legacy = load_fixture("jogg_webhook_video_success.json")
    legacy["data"]["project_id"] = legacy["data"].pop("video_id")
    assert parse_callback(legacy).event is not None
    other = parse_callback({"event_id": "evt_9", "event": "avatar_created", "data": {}})
    assert other.event is None and other.dedupe_key == "jogg:evt_9"
    no_id = parse_callback({"event": "generated_avatar_video_success", "data": {"video_id": "v"}})
    assert no_id.dedupe_key.startswith("jogg:sha256:")
