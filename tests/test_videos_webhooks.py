"""The webhook receivers on the real app (uvicorn on loopback), on SQLite and PostgreSQL:
authentication, stored-once deliveries in any order, Argil confirmation, unknown events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.store import SqlStore, open_store
from cvi_agent.videos import webhooks
from cvi_agent.videos.jogg import signature
from cvi_agent.videos.service import write_secret
from tests.support import DATABASES, ServerFactory, fresh_database_url, load_fixture
from tests.videos_support import (
    CALLBACK_TOKEN,
    fake_providers,
    provider_settings,
)

SECRET = "whsec_test_0123456789"
ARGIL_OK = "3c90c3cc-0d44-4b50-8888-8dd25736052a"
ARGIL_FAILED = "5d1e2f3a-0d44-4b50-8888-8dd25736052b"
CONVERSATION = "c0a1b2c3d4"


@pytest.fixture(params=DATABASES)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async for url in fresh_database_url(request.param, tmp_path):
        yield url


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.05, deliver_webhooks=False) as f:
        yield f


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[SqlStore]:
    """The same database the server uses, opened on the test's loop to check what it stored."""
    s = await open_store(db_url)
    yield s
    await s.aclose()


def start(serve: ServerFactory, fake: FakeVideoProviders | None, db_url: str, **kw: Any) -> str:
    overrides: dict[str, Any] = {
        **provider_settings(fake),
        "database_url": db_url,
        "callback_token": CALLBACK_TOKEN,
        "jogg_webhook_secret": SECRET,
        "video_poll_interval": 0,
    }
    overrides.update(kw)
    server: LoopbackServer = serve(None, **overrides)
    return server.url


def signed(payload: dict[str, Any], secret: str = SECRET) -> dict[str, Any]:
    raw = json.dumps(payload).encode()
    return {
        "content": raw,
        "headers": {
            "content-type": "application/json",
            "X-Webhook-Signature": signature(secret, raw),
            "X-Webhook-Event": str(payload.get("event")),
        },
    }


async def test_every_fixture_twice_and_out_of_order_is_stored_once(
    serve: ServerFactory, fake: FakeVideoProviders, db_url: str, db: SqlStore
) -> None:
    fake.seed("argil", ARGIL_OK, extras={"conversation_id": CONVERSATION})
    url = start(serve, fake, db_url)
    argil_ok = load_fixture("argil_webhook_video_success.json")
    argil_failed = load_fixture("argil_webhook_video_failed.json")
    jogg_ok = load_fixture("jogg_webhook_video_success.json")
    jogg_failed = load_fixture("jogg_webhook_video_failed.json")
    async with httpx.AsyncClient(base_url=url) as http:
        for payload in (argil_ok, argil_failed, argil_failed, argil_ok):
            r = await http.post(f"/callbacks/argil?token={CALLBACK_TOKEN}", json=payload)
            assert r.status_code == 200, r.text
        for payload in (jogg_failed, jogg_ok, jogg_ok, jogg_failed):
            r = await http.post("/callbacks/jogg", **signed(payload))
            assert r.status_code == 200, r.text
            assert r.json()["received"] is True
    assert await db.count_events(source="video") == 4
    keys = sorted(e.dedupe_key for e in await db.list_events(CONVERSATION, source="video"))
    assert keys == [
        f"argil:VIDEO_GENERATION_FAILED:{ARGIL_FAILED}",
        f"argil:VIDEO_GENERATION_SUCCESS:{ARGIL_OK}",
    ]
    ok = await db.get_video("argil", ARGIL_OK)
    assert ok is not None and ok.status == "ready" and ok.conversation_id == CONVERSATION
    assert ok.url == f"https://storage.example.test/argil/{ARGIL_OK}.mp4"  # from the API
    failed = await db.get_video("argil", ARGIL_FAILED)
    assert failed is not None and failed.status == "failed" and failed.error
    jogg = await db.get_video("jogg", "video_123456")
    assert jogg is not None and jogg.status == "ready"
    assert jogg.url == "https://res.example.test/videos/video_123456.mp4"
    jogg_bad = await db.get_video("jogg", "video_123457")
    assert jogg_bad is not None and jogg_bad.status == "failed"
    assert jogg_bad.error == "Video generation failed (code 50000)"
    listed = await db.list_videos(CONVERSATION)
    assert sorted(v.video_id for v in listed) == sorted([ARGIL_OK, ARGIL_FAILED])
    # The success was confirmed with exactly one GET; the duplicate found it ready already.
    assert fake.count("argil", "GET", f"/videos/{ARGIL_OK}") == 1


async def test_jogg_wrong_or_missing_signature_is_401_and_nothing_is_stored(
    serve: ServerFactory, db_url: str, db: SqlStore
) -> None:
    url = start(serve, None, db_url)
    payload = load_fixture("jogg_webhook_video_success.json")
    async with httpx.AsyncClient(base_url=url) as http:
        wrong = await http.post("/callbacks/jogg", **signed(payload, "whsec_not_ours"))
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_signature"
        missing = await http.post("/callbacks/jogg", json=payload)
        assert missing.status_code == 401
        tampered = signed(payload)
        tampered["content"] = tampered["content"].replace(b"completed", b"failed")
        assert (await http.post("/callbacks/jogg", **tampered)).status_code == 401
        bad_token = await http.post("/callbacks/jogg?token=nope", json=payload)
        assert bad_token.status_code == 401
        assert (await http.post("/callbacks/jogg", **signed(payload))).status_code == 200
        # A per-request webhook_url delivery: authenticated by the token in the URL.
        failed = load_fixture("jogg_webhook_video_failed.json")
        by_token = await http.post(f"/callbacks/jogg?token={CALLBACK_TOKEN}", json=failed)
        assert by_token.status_code == 200
    assert await db.count_events(source="video") == 2
    assert {v.video_id for v in await db.list_videos()} == {"video_123456", "video_123457"}


async def test_jogg_secret_from_the_registration_file(
    serve: ServerFactory, tmp_path: Path, db_url: str, db: SqlStore
) -> None:
    write_secret(tmp_path / "var" / "jogg-webhook-secret", "whsec_from_file")
    assert (tmp_path / "var" / "jogg-webhook-secret").stat().st_mode & 0o777 == 0o600
    url = start(serve, None, db_url, jogg_webhook_secret="")
    payload = load_fixture("jogg_webhook_video_success.json")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/callbacks/jogg", **signed(payload, "whsec_from_file"))
        assert r.status_code == 200
    assert await db.count_events(source="video") == 1


async def test_jogg_without_any_secret_refuses(serve: ServerFactory, tmp_path: Path) -> None:
    url = start(serve, None, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", jogg_webhook_secret="")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/callbacks/jogg", **signed(load_fixture("jogg_webhook_video_success.json"))
        )
    assert r.status_code == 503 and r.json()["error"]["code"] == "callbacks_not_configured"


async def test_argil_token_is_required(serve: ServerFactory, db_url: str, db: SqlStore) -> None:
    url = start(serve, None, db_url)
    payload = load_fixture("argil_webhook_video_failed.json")
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.post("/callbacks/argil", json=payload)).status_code == 401
        wrong = await http.post("/callbacks/argil?token=cb-token-012345678X", json=payload)
        assert wrong.status_code == 401
        assert (await http.post("/callbacks/argil/wrong", json=payload)).status_code == 401
        assert await db.count_events() == 0
        ok = await http.post(f"/callbacks/argil/{CALLBACK_TOKEN}", json=payload)
        assert ok.status_code == 200 and ok.json()["video_id"] == ARGIL_FAILED
    assert await db.count_events(source="video") == 1


async def test_argil_without_a_callback_token_refuses(serve: ServerFactory, tmp_path: Path) -> None:
    url = start(serve, None, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", callback_token="")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/callbacks/argil?token=", json=load_fixture("argil_webhook_video_success.json")
        )
    assert r.status_code == 503


async def test_argil_success_is_not_trusted_until_the_api_agrees(
    serve: ServerFactory, fake: FakeVideoProviders, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'argil.db'}"
    # Still rendering on Argil's side: a "success" claim must not make it ready.
    video = fake.seed(
        "argil", ARGIL_OK, status="GENERATING_VIDEO", extras={"conversation_id": CONVERSATION}
    )
    url = start(serve, fake, db_url)
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            f"/callbacks/argil?token={CALLBACK_TOKEN}",
            json=load_fixture("argil_webhook_video_success.json"),
        )
        assert r.status_code == 200
    db = await open_store(db_url)
    try:
        stored = await db.get_video("argil", ARGIL_OK)
        assert stored is not None and stored.status == "rendering" and stored.url is None
        [row] = await db.list_events(CONVERSATION, source="video")
        assert row.kind == "VIDEO_GENERATION_SUCCESS"
        assert row.payload["raw"] == load_fixture("argil_webhook_video_success.json")
        # Once Argil agrees, a redelivery (or the poller) makes it ready.
        video.pinned = None
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                f"/callbacks/argil?token={CALLBACK_TOKEN}",
                json=load_fixture("argil_webhook_video_success.json"),
            )
            assert r.status_code == 200
        stored = await db.get_video("argil", ARGIL_OK)
        assert stored is not None and stored.status == "ready" and stored.url
        assert await db.count_events(source="video") == 1
    finally:
        await db.aclose()


async def test_argil_success_with_the_api_unreachable_is_left_rendering(
    serve: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "ARGIL_CONFIRM_TIMEOUT", 0.5)  # the server runs in-process
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'argil.db'}"
    url = start(serve, None, db_url)  # provider URLs point at a closed port
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post(
            f"/callbacks/argil?token={CALLBACK_TOKEN}",
            json=load_fixture("argil_webhook_video_success.json"),
        )
        assert r.status_code == 200
    db = await open_store(db_url)
    try:
        stored = await db.get_video("argil", ARGIL_OK)
        assert stored is not None and stored.status == "rendering"
        assert stored.conversation_id == CONVERSATION
    finally:
        await db.aclose()


async def test_unknown_events_are_kept_and_acknowledged(
    serve: ServerFactory, db_url: str, db: SqlStore
) -> None:
    url = start(serve, None, db_url)
    avatar = {
        "event": "AVATAR_TRAINING_SUCCESS",
        "data": {"avatarId": "av1", "avatarName": "Maya", "extras": {"conversation_id": "c9"}},
    }
    novel = {"event_id": "evt_new", "event": "avatar_created", "data": {"avatar_id": 5}}
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(2):
            r = await http.post(f"/callbacks/argil?token={CALLBACK_TOKEN}", json=avatar)
            assert r.status_code == 200 and r.json()["video_id"] is None
            assert (await http.post("/callbacks/jogg", **signed(novel))).status_code == 200
    assert await db.count_events(source="video") == 2
    [kept] = await db.list_events("c9", source="video")
    assert kept.kind == "AVATAR_TRAINING_SUCCESS" and kept.payload["raw"] == avatar
    [other] = await db.list_events("", source="video")
    assert other.kind == "avatar_created" and other.payload["raw"] == novel
    assert await db.list_videos() == []


async def test_bad_bodies_are_refused_without_storing(serve: ServerFactory, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bad.db'}"
    url = start(serve, None, db_url, max_body_bytes=4096)
    async with httpx.AsyncClient(base_url=url) as http:
        argil = f"/callbacks/argil?token={CALLBACK_TOKEN}"
        r = await http.post(
            argil, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert (await http.post(argil, json=[1, 2])).status_code == 400
        big = {"event": "VIDEO_GENERATION_SUCCESS", "data": {"videoId": "x" * 5000}}
        assert (await http.post(argil, json=big)).status_code == 413
        unsigned_junk = signed({"x": 1})
        unsigned_junk["content"] = b"\xff\xfe"
        unsigned_junk["headers"]["X-Webhook-Signature"] = signature(SECRET, b"\xff\xfe")
        assert (await http.post("/callbacks/jogg", **unsigned_junk)).status_code == 400
    db = await open_store(db_url)
    try:
        assert await db.count_events() == 0
    finally:
        await db.aclose()
