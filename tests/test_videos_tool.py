"""The `create_video` server tool: never in a speculative generation, exactly one create when
allowed, speakable errors, persona validation, announcements, and the whole loop through the
chat endpoint with the shipped `recap` persona."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from cvi_agent.devtools.fakes.videos import FakeVideoProviders
from cvi_agent.llm.tools import SideEffectsNotAllowed, ToolRunner
from cvi_agent.personas import Persona, load_personas
from cvi_agent.protocol.interactions import AppendContext, Echo, Interaction
from cvi_agent.store import SqlStore, VideoRecord, open_store
from cvi_agent.videos.announce import announce_video_ready
from cvi_agent.videos.service import VideoService
from cvi_agent.videos.tool import validate_video_tools
from tests.support import API_KEY, PERSONAS, ServerFactory
from tests.videos_support import (
    CALLBACK_TOKEN,
    FAST_RETRY,
    fake_providers,
    provider_settings,
    video_settings,
    wait_until,
)

ARGIL_AVATAR = "a1b2c3d4-0000-4000-8000-000000000001"


def persona(side_effects: bool = True, **options: Any) -> Persona:
    opts = {"provider": "argil", "avatar": ARGIL_AVATAR, "voice": "v1", "on_ready": "echo"}
    opts.update(options)
    return Persona.model_validate(
        {
            "name": "videomaker",
            "persona_name": "Vic",
            "brain": {"kind": "echo"},
            "tools": [
                {
                    "type": "function",
                    "execution": "server",
                    "handler": "create_video",
                    "side_effects": side_effects,
                    "timeout": 5,
                    "options": opts,
                    "function": {
                        "name": "create_video",
                        "parameters": {
                            "type": "object",
                            "properties": {"script": {"type": "string"}},
                        },
                    },
                }
            ],
        }
    )


@pytest.fixture
def fake() -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.05, deliver_webhooks=False) as f:
        yield f


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqlStore]:
    """SQLite; the paths that matter run on PostgreSQL too (they ask for `store`)."""
    s = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'tool.db'}")
    yield s
    await s.aclose()


@pytest.fixture
async def service(
    fake: FakeVideoProviders, db: SqlStore, tmp_path: Path
) -> AsyncIterator[VideoService]:
    svc = VideoService(video_settings(tmp_path, fake), db, retry=FAST_RETRY)
    yield svc
    await svc.aclose()


def runner(p: Persona, service: VideoService | None) -> ToolRunner:
    return ToolRunner(p, [], 5.0, services={"videos": service} if service else {})


ARGS = json.dumps({"script": "Hi Maya, here is your recap.", "title": "Recap for Maya"})


async def test_speculative_generation_never_reaches_the_provider(
    fake: FakeVideoProviders, store: SqlStore, tmp_path: Path
) -> None:
    service = VideoService(video_settings(tmp_path, fake), store, retry=FAST_RETRY)
    tools = runner(persona(), service)
    with pytest.raises(SideEffectsNotAllowed):
        await tools.run("create_video", ARGS, "call_1", "conv-1", side_effects_allowed=False)
    assert fake.requests == [] and fake.creates["argil"] == []
    assert await store.list_videos() == []

    result = await tools.run("create_video", ARGS, "call_2", "conv-1", side_effects_allowed=True)
    assert result.ok, result.output
    output = json.loads(result.output)
    assert output["status"] == "queued" and output["provider"] == "argil"
    assert "let you know" in output["message"]
    assert len(fake.creates["argil"]) == 1
    assert fake.creates["argil"][0]["extras"] == {"conversation_id": "conv-1"}
    [video] = await store.list_videos("conv-1")
    assert video.video_id == output["video_id"] and video.status == "rendering"
    assert video.script == "Hi Maya, here is your recap."
    assert (
        video.raw["_cvi"]["on_ready"] == "echo" and video.raw["_cvi"]["title"] == "Recap for Maya"
    )
    [row] = await store.list_events("conv-1", source="video")
    assert row.kind == "video.created" and row.payload["video_id"] == video.video_id
    await service.aclose()


async def test_the_builtin_is_guarded_even_when_the_yaml_forgets(
    fake: FakeVideoProviders, service: VideoService
) -> None:
    tools = runner(persona(side_effects=False), service)
    with pytest.raises(SideEffectsNotAllowed):
        await tools.run("create_video", ARGS, "call_1", "conv-1", side_effects_allowed=False)
    assert fake.requests == []


async def test_provider_failures_become_speakable_errors(
    fake: FakeVideoProviders, service: VideoService, db: SqlStore
) -> None:
    tools = runner(persona(), service)
    fake.fail_next("argil", "POST", "/videos", status=400, body={"code": 400, "message": "bad"})
    refused = await tools.run("create_video", ARGS, "c1", "conv-1")
    assert not refused.ok
    assert json.loads(refused.output) == {"error": "Sorry, the video service refused the request."}
    fake.fail_next("argil", "POST", "/videos", status=503, times=FAST_RETRY.attempts)
    busy = await tools.run("create_video", ARGS, "c2", "conv-1")
    assert not busy.ok and "busy" in json.loads(busy.output)["error"]
    empty = await tools.run("create_video", json.dumps({"script": "  "}), "c3", "conv-1")
    assert not empty.ok and "words" in json.loads(empty.output)["error"]
    assert await db.list_videos() == []
    # Argil took the video but refused to render it: the record keeps it, as failed.
    fake.fail_next("argil", "POST", "/render", status=402, body={"code": 402, "message": "credits"})
    unrendered = await tools.run("create_video", ARGS, "c4", "conv-1")
    assert not unrendered.ok
    [kept] = await db.list_videos("conv-1")
    assert kept.status == "failed" and kept.error and "credits" in kept.error


async def test_a_slow_provider_is_cut_short(
    fake: FakeVideoProviders, service: VideoService
) -> None:
    fake.fail_next("argil", "POST", "/videos", status=None, delay=1.0)
    tools = runner(persona(create_timeout=0.2), service)
    started = time.monotonic()
    result = await tools.run("create_video", ARGS, "c1", "conv-1")
    assert time.monotonic() - started < 0.8
    assert not result.ok and "in time" in json.loads(result.output)["error"]


async def test_missing_service_or_key(db: SqlStore, tmp_path: Path) -> None:
    no_service = await runner(persona(), None).run("create_video", ARGS, "c1", "conv-1")
    assert not no_service.ok and "can't make videos" in no_service.output
    settings = video_settings(tmp_path, None, argil_api_key="")
    svc = VideoService(settings, db)
    try:
        no_key = await runner(persona(), svc).run("create_video", ARGS, "c1", "conv-1")
        assert not no_key.ok and "isn't set up on this server" in no_key.output
    finally:
        await svc.aclose()


def test_persona_options_are_validated() -> None:
    problems = validate_video_tools(
        persona(provider="vimeo", avatar="", on_ready="shout", colour="red")
    )
    text = "\n".join(problems)
    assert "options.provider" in text and "options.avatar" in text
    assert "options.on_ready" in text and "unknown options colour" in text
    assert validate_video_tools(persona()) == []
    shipped = load_personas(PERSONAS)
    assert validate_video_tools(shipped["recap"]) == []
    spec = shipped["recap"].tool("create_video")
    assert spec is not None and spec.side_effects and spec.execution == "server"


# -- announcements --------------------------------------------------------------------------------


def ready_video(on_ready: str, conversation_id: str = "conv-1") -> VideoRecord:
    return VideoRecord(
        "argil",
        "v1",
        "ready",
        conversation_id=conversation_id,
        url="https://x.test/v1.mp4",
        raw={"_cvi": {"on_ready": on_ready, "title": "Recap"}},
    )


async def test_announce_echo_once(store: SqlStore) -> None:
    published: list[tuple[str, Interaction]] = []

    async def publish(conversation_id: str, interaction: Interaction) -> None:
        published.append((conversation_id, interaction))

    video = ready_video("echo")
    first = await announce_video_ready(store, video, publish=publish)
    again = await announce_video_ready(store, video, publish=publish)
    assert isinstance(first, Echo) and "ready" in first.text and again is None
    assert published == [("conv-1", first)]
    [row] = await store.list_events("conv-1", source="video")
    assert row.kind == "video.announce"
    assert row.payload["message"] == {
        "message_type": "conversation",
        "event_type": "conversation.echo",
        "conversation_id": "conv-1",
        "properties": {"modality": "text", "text": first.text},
    }


async def test_announce_append_context_none_and_ended(db: SqlStore) -> None:
    store = db
    context = await announce_video_ready(store, ready_video("append_context"))
    assert isinstance(context, AppendContext)
    assert "https://x.test/v1.mp4" in context.context and "Recap" in context.context
    assert await announce_video_ready(store, ready_video("none", "conv-2")) is None
    await store.upsert_conversation("conv-3")
    await store.upsert_conversation("conv-3", status="ended")
    assert await announce_video_ready(store, ready_video("echo", "conv-3")) is None
    assert await store.count_events("conv-2") == 0 and await store.count_events("conv-3") == 0

    async def broken(conversation_id: str, interaction: Interaction) -> None:
        raise RuntimeError("bus down")

    # A failing publisher never breaks the webhook that triggered it.
    assert await announce_video_ready(store, ready_video("echo", "conv-4"), publish=broken) is None


# -- the whole loop -------------------------------------------------------------------------------


async def test_recap_persona_end_to_end_through_the_poller(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Chat turn → create_video (Tavus fake) → poller finishes it → record shows it, announced."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'e2e.db'}"
    with fake_providers(stage_seconds=0.05) as fake:
        server = serve(
            None,
            **provider_settings(fake),
            database_url=db_url,
            callback_token=CALLBACK_TOKEN,
            video_poll_interval=0.05,
        )
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="recap",
                messages=[
                    {"role": "user", "content": "Could you send me a recap about the launch plan?"}
                ],
                extra_headers={"conversation_id": "conv-e2e"},
            )
        text = reply.choices[0].message.content or ""
        assert text.startswith("Sure.") and "let you know when it's ready" in text
        [body] = fake.creates["tavus"]
        assert "about the launch plan" in body["script"] and body["replica_id"] == "r79e1c033f"
        assert body["callback_url"].endswith(f"/callbacks/tavus?token={CALLBACK_TOKEN}")
        db = await open_store(db_url)
        try:

            async def ready() -> bool:
                videos = await db.list_videos("conv-e2e")
                return bool(videos) and videos[0].status == "ready"

            async def announced() -> bool:
                events = await db.list_events("conv-e2e", source="video")
                return any(e.kind == "video.announce" for e in events)

            await wait_until(ready, within=10)
            [video] = await db.list_videos("conv-e2e")
            assert video.url and video.url.endswith(".mp4") and video.provider == "tavus"
            # the announcement follows the status update (same poller pass, a moment later)
            await wait_until(announced, within=10)
            kinds = [e.kind for e in await db.list_events("conv-e2e", source="video")]
            assert kinds[0] == "video.created" and "video.announce" in kinds
            [announce] = [
                e
                for e in await db.list_events("conv-e2e", source="video")
                if e.kind == "video.announce"
            ]
            assert announce.payload["interaction"]["type"] == "echo"
            assert "recap video is ready" in announce.payload["interaction"]["text"]
        finally:
            await db.aclose()
    assert len(fake.creates["tavus"]) == 1


async def test_argil_end_to_end_through_its_webhook(serve: ServerFactory, tmp_path: Path) -> None:
    """With the poller off, the fake's account webhook alone completes the video (confirmed)."""
    personas_dir = tmp_path / "personas"
    personas_dir.mkdir()
    recap = yaml.safe_load((PERSONAS / "recap.yaml").read_text())
    recap["tools"][0]["options"].update(
        {"provider": "argil", "avatar": ARGIL_AVATAR, "voice": "v1", "on_ready": "append_context"}
    )
    (personas_dir / "recap.yaml").write_text(yaml.safe_dump(recap))
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'argil.db'}"
    with fake_providers(stage_seconds=0.05) as fake:
        server = serve(
            None,
            **provider_settings(fake),
            personas_dir=personas_dir,
            database_url=db_url,
            callback_token=CALLBACK_TOKEN,
            video_poll_interval=0,
        )
        fake.argil_webhooks["hook"] = {
            "id": "hook",
            "callbackUrl": f"{server.url}/callbacks/argil?token={CALLBACK_TOKEN}",
            "events": ["VIDEO_GENERATION_SUCCESS", "VIDEO_GENERATION_FAILED"],
        }
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model="recap",
                messages=[{"role": "user", "content": "send me a recap"}],
                extra_headers={"x-conversation-id": "conv-argil"},
                stream=True,
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "let you know" in text
        db = await open_store(db_url)
        try:

            async def ready() -> bool:
                videos = await db.list_videos("conv-argil")
                return bool(videos) and videos[0].status == "ready"

            await wait_until(ready, within=10)
            await asyncio.sleep(0.1)
            kinds = sorted(e.kind for e in await db.list_events("conv-argil", source="video"))
            assert kinds == ["VIDEO_GENERATION_SUCCESS", "video.announce", "video.created"]
        finally:
            await db.aclose()
        assert [d["status"] for d in fake.deliveries] == [200]
        # confirmed with the API before being trusted
        assert fake.count("argil", "GET", "/videos/") == 1
