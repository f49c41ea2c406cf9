"""The orchestration API on real uvicorn: create on (fake) Tavus, list, get, interactions, end,
the live feed, and turn recording — with the in-process worker and a recording test bot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.protocol.interactions import Echo
from cvi_agent.store import Leases, VideoRecord, open_store
from tests.bots import BOTS, RecordingBot
from tests.support import (
    API_KEY,
    CALLBACK_TOKEN,
    ServerFactory,
    eventually,
    load_fixture,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def create(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await http.post(
        "/api/conversations", json={"persona": "interviewer", **body}, headers=AUTH
    )
    assert resp.status_code == 201, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def bot_for(cid: str) -> RecordingBot:
    async def started() -> RecordingBot | None:
        bots = BOTS.get(cid)
        return bots[-1] if bots and bots[-1].started.is_set() else None

    bot: RecordingBot = await eventually(started)
    return bot


async def test_create_interact_end(app_server: ServerFactory, fake_tavus: FakeTavus) -> None:
    server = app_server(interactions_via="bot")  # the REST path: test_conversations_delivery
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        created = await create(http, conversational_context="A screening call.")
        cid = created["conversation"]["id"]
        assert created["conversation"]["persona"] == "interviewer"
        assert created["bot"] == {"requested": True}
        assert "token=" not in json.dumps(created) or "token=***" in json.dumps(created)

        # The persona was pushed first, then the conversation created, pointing back at us.
        [push] = fake_tavus.requests("POST", "/v2/personas")
        assert push.body["layers"]["llm"]["base_url"] == server.url + "/v1"
        assert push.body["layers"]["llm"]["model"] == "interviewer"
        [made] = fake_tavus.requests("POST", "/v2/conversations")
        assert made.body["callback_url"] == f"{server.url}/callbacks/tavus?token={CALLBACK_TOKEN}"
        assert made.body["max_participants"] >= 3
        assert made.body["conversational_context"] == "A screening call."

        bot = await bot_for(cid)
        assert bot.url == created["conversation_url"]
        assert bot.spec.persona is not None and bot.spec.persona.name == "interviewer"

        resp = await http.post(
            f"/api/conversations/{cid}/interactions",
            json={"type": "echo", "text": "Hello from the API"},
            headers={**AUTH, "Idempotency-Key": "once-1"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["message"] == Echo(text="Hello from the API").to_message(cid)
        again = await http.post(
            f"/api/conversations/{cid}/interactions",
            json={"type": "echo", "text": "Hello from the API"},
            headers={**AUTH, "Idempotency-Key": "once-1"},
        )
        assert again.status_code == 200
        assert [i.model_dump() for i in bot.sent] == [Echo(text="Hello from the API").model_dump()]

        bad = await http.post(
            f"/api/conversations/{cid}/interactions",
            json={"type": "sensitivity", "participant_pause_sensitivity": "extreme"},
            headers=AUTH,
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_interaction"
        wrong_type = await http.post(
            f"/api/conversations/{cid}/interactions", json={"type": "dance"}, headers=AUTH
        )
        assert wrong_type.status_code == 400
        missing = await http.post(
            "/api/conversations/nope/interactions", json={"type": "interrupt"}, headers=AUTH
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "conversation_not_found"

        bot.fail_sends = True
        failed = await http.post(
            f"/api/conversations/{cid}/interactions", json={"type": "interrupt"}, headers=AUTH
        )
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "send_failed"
        bot.fail_sends = False

        record = (await http.get(f"/api/conversations/{cid}", headers=AUTH)).json()
        kinds = [(e["source"], e["kind"]) for e in record["events"]]
        assert ("api", "conversation.created") in kinds
        assert ("bot", "worker.started") in kinds
        assert kinds.count(("bot", "interaction.conversation.echo")) == 1
        assert record["bot"]["held"] is True

        ended = await http.post(f"/api/conversations/{cid}/end", headers=AUTH)
        assert ended.status_code == 200, ended.text
        body = ended.json()
        assert body["tavus_ended"] is True and body["bot_stopped"] is True
        assert body["conversation"]["status"] == "ended"
        assert fake_tavus.conversations[cid]["status"] == "ended"
        await eventually(lambda: _true(bot.stopped is not None))

        # Tavus calls back with the shutdown; it lands here and keeps the record consistent.
        async def shutdown_stored() -> bool:
            rec = (await http.get(f"/api/conversations/{cid}", headers=AUTH)).json()
            return any(e["kind"] == "system.shutdown" for e in rec["events"])

        await eventually(shutdown_stored)
        final = (await http.get(f"/api/conversations/{cid}", headers=AUTH)).json()
        assert final["conversation"]["shutdown_reason"] == "end_conversation_endpoint_hit"
        assert final["bot"] is None

        late = await http.post(
            f"/api/conversations/{cid}/interactions", json={"type": "interrupt"}, headers=AUTH
        )
        assert late.status_code == 409 and late.json()["error"]["code"] == "conversation_ended"


async def _true(value: bool) -> bool:
    return value


async def test_no_bot_attached_is_409(app_server: ServerFactory) -> None:
    server = app_server(interactions_via="bot")
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        created = await create(http, bot=False)
        cid = created["conversation"]["id"]
        resp = await http.post(
            f"/api/conversations/{cid}/interactions", json={"type": "interrupt"}, headers=AUTH
        )
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "bot_not_attached"
        two = await http.post(
            "/api/conversations",
            json={"persona": "interviewer", "max_participants": 2},
            headers=AUTH,
        )
        assert two.status_code == 400 and two.json()["error"]["param"] == "max_participants"


async def test_tavus_errors_surface_clearly(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    server = app_server()
    unconfigured = app_server(tavus_api_key="")
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        fake_tavus.fail_next(401, {"message": "Invalid access token"})
        auth = await http.post("/api/conversations", json={"persona": "echo"}, headers=AUTH)
        assert auth.status_code == 502
        assert auth.json()["error"]["code"] == "tavus_auth_failed"
        assert "Invalid access token" in auth.json()["error"]["message"]

        fake_tavus.fail_next(400, {"error": "Invalid replica_id"}, path_prefix="/v2/conversations")
        bad = await http.post(
            "/api/conversations", json={"persona": "echo", "replica_id": "rX"}, headers=AUTH
        )
        assert bad.status_code == 400 and "Invalid replica_id" in bad.json()["error"]["message"]

        fake_tavus.fail_next(429, {"message": "Rate limit"}, count=1, headers={"Retry-After": "0"})
        ok = await http.post("/api/conversations", json={"persona": "echo"}, headers=AUTH)
        assert ok.status_code == 201, ok.text

        unknown = await http.post("/api/conversations", json={"persona": "zz"}, headers=AUTH)
        assert unknown.status_code == 404
        extra = await http.post(
            "/api/conversations", json={"persona": "echo", "x": 1}, headers=AUTH
        )
        assert extra.status_code == 400
        noauth = await http.post("/api/conversations", json={"persona": "echo"})
        assert (
            noauth.status_code == 401 and noauth.json()["error"]["type"] == "authentication_error"
        )
    async with httpx.AsyncClient(base_url=unconfigured.url, timeout=15) as http:
        resp = await http.post("/api/conversations", json={"persona": "echo"}, headers=AUTH)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "tavus_not_configured"


async def test_list_is_paginated_with_a_cursor(app_server: ServerFactory) -> None:
    server = app_server(run_worker=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        ids = []
        for n in range(5):
            body = {
                "event_type": "system.replica_joined",
                "conversation_id": f"c-{n}",
                "timestamp": f"2025-01-01T00:00:0{n}Z",
                "properties": {},
            }
            resp = await http.post("/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=body)
            assert resp.status_code == 200
            ids.append(f"c-{n}")
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/api/conversations", params=params, headers=AUTH)).json()
            seen += [c["id"] for c in page["data"]]
            pages += 1
            cursor = page["next_cursor"]
            if not page["has_more"]:
                assert cursor is None
                break
        assert pages == 3 and sorted(seen) == ids and len(set(seen)) == 5
        # each item says when its latest event arrived, and `now` is the server's clock
        page = (await http.get("/api/conversations", headers=AUTH)).json()
        assert all(0 < c["last_event_at"] <= page["now"] for c in page["data"]), page
        assert seen == sorted(seen, reverse=True) or len(seen) == 5
        bad = await http.get("/api/conversations", params={"cursor": "!!"}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
        assert (await http.get("/api/conversations/nope", headers=AUTH)).status_code == 404
        assert (await http.get("/api/conversations")).status_code == 401


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return message


async def test_live_feed_backlog_then_live(app_server: ServerFactory) -> None:
    server = app_server(run_worker=False)
    ws_url = server.url.replace("http://", "ws://")
    joined = load_fixture("callback_replica_joined.json")
    shutdown = load_fixture("callback_shutdown.json")
    cid = joined["conversation_id"]
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        await http.post("/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=joined)
        async with connect(f"{ws_url}/api/conversations/{cid}/live?key={API_KEY}") as ws:
            backlog = await _recv(ws)
            assert (
                backlog["type"] == "event" and backlog["event"]["kind"] == "system.replica_joined"
            )
            assert await _recv(ws) == {"type": "live", "backlog": 1}
            await http.post("/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=shutdown)
            await http.post(
                "/callbacks/tavus", params={"token": CALLBACK_TOKEN}, json=shutdown
            )  # dup
            live = await _recv(ws)
            assert live["event"]["kind"] == "system.shutdown"
            assert live["event"]["payload"]["properties"]["shutdown_reason"] == (
                "participant_left_timeout"
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)  # the duplicate is not re-published
            first_id = backlog["event"]["id"]
        # Resume after an id; authenticate with a subprotocol, as a browser would.
        async with connect(
            f"{ws_url}/api/conversations/{cid}/live?after={first_id}",
            subprotocols=["cvi-agent", f"bearer.{API_KEY}"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "cvi-agent"
            assert (await _recv(ws))["event"]["kind"] == "system.shutdown"
            assert (await _recv(ws))["type"] == "live"
        async with connect(  # the console's spelling
            f"{ws_url}/api/conversations/{cid}/live",
            subprotocols=["cvi-agent", f"key.{API_KEY}"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "cvi-agent"
            assert (await _recv(ws))["type"] == "event"
        async with connect(f"{ws_url}/api/conversations/{cid}/live", additional_headers=AUTH) as ws:
            assert (await _recv(ws))["type"] == "event"
    for url, status in (
        (f"{ws_url}/api/conversations/{cid}/live", 401),
        (f"{ws_url}/api/conversations/{cid}/live?key=wrong", 401),
        (f"{ws_url}/api/conversations/missing/live?key={API_KEY}", 404),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == status
        assert b'"error"' in (refused.value.response.body or b"")


async def test_turns_recorded_off_the_hot_path(app_server: ServerFactory) -> None:
    server = app_server(run_worker=False)
    cid = "c-turns"
    messages = [
        {"role": "system", "content": "You are Iris."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "Hi, I'm Iris. I have a few quick questions for you. What's your name?",
        },
        {"role": "user", "content": "USER_SPEECH: Maya VISUAL_SCENE: a person"},
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": "interviewer", "stream": True, "messages": messages},
            headers={**AUTH, "conversation_id": cid},
        )
        assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
        plain = await http.post(
            "/v1/chat/completions",
            json={"model": "interviewer", "stream": False, "messages": messages},
            headers={**AUTH, "x-conversation-id": cid},
        )
        assert plain.status_code == 200

        # Nothing recorded without a conversation id; the two turns are.
        await http.post(
            "/v1/chat/completions",
            json={"model": "echo", "stream": True, "messages": messages},
            headers=AUTH,
        )

        async def recorded() -> dict[str, Any] | None:
            rec = (await http.get(f"/api/conversations/{cid}/events", headers=AUTH)).json()
            turns = [e for e in rec.get("data", []) if e["kind"] == "llm.turn"]
            return rec if len(turns) == 2 else None

        await eventually(recorded)
        events = (await http.get(f"/api/conversations/{cid}/events", headers=AUTH)).json()
    turns = [e for e in events["data"] if e["kind"] == "llm.turn"]
    streamed = next(t for t in turns if t["payload"]["stream"])
    assert streamed["source"] == "llm"
    assert streamed["payload"]["completed"] is True
    assert 0 <= streamed["payload"]["ttft_ms"] <= streamed["payload"]["total_ms"]
    assert streamed["payload"]["answers"] == {"name": "Maya"}
    app: Any = server.server.config.app
    assert app.state.runtime.conversations.turns.dropped == 0


async def test_ready_video_is_announced_through_the_bot(
    app_server: ServerFactory, tmp_path: Path
) -> None:
    """A Tavus video callback on /callbacks/tavus → the videos module → `ConversationService.announce` →
    the bus → the conversation's bot, which says it in the room."""
    server = app_server(interactions_via="bot")
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        cid = (await create(http))["conversation"]["id"]
        bot = await bot_for(cid)
        store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}")
        try:
            await store.upsert_video(
                VideoRecord(
                    "tavus",
                    "vid-1",
                    "rendering",
                    conversation_id=cid,
                    raw={"_cvi": {"on_ready": "echo", "ready_text": "Your recap is ready."}},
                )
            )
        finally:
            await store.aclose()
        resp = await http.post(
            "/callbacks/tavus",
            params={"token": CALLBACK_TOKEN},
            json={"video_id": "vid-1", "status": "ready", "download_url": "https://v/1.mp4"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["kind"] == "video.ready"
        await eventually(lambda: _true(Echo(text="Your recap is ready.") in bot.sent))


# -- which rooms the bot may join (SSRF) -------------------------------------------------------


class Doorbell:
    """A TCP listener on loopback that only counts who knocks: a bot sent to it would connect."""

    def __init__(self) -> None:
        self.knocks = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Doorbell:
        async def knock(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.knocks += 1
            writer.close()

        self.server = await asyncio.start_server(knock, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()  # not wait_closed(): a bot still knocking would hold it open


REFUSED_ROOMS = [
    ("ws://127.0.0.1:{port}/room", "CVI_LOCAL_ROOMS"),
    ("ws://localhost:{port}/room", "CVI_LOCAL_ROOMS"),
    ("wss://[::1]:{port}/room", "CVI_LOCAL_ROOMS"),
    ("http://127.0.0.1:{port}/room", "CVI_ROOM_HOSTS"),
    ("https://tavus.daily.co@127.0.0.1:{port}/room", "conversation_url"),
    ("https://tavus.daily.co.evil.example/room", "CVI_ROOM_HOSTS"),
    ("https://evil.example/tavus.daily.co", "CVI_ROOM_HOSTS"),
    ("https://169.254.169.254/latest/meta-data", "CVI_ROOM_HOSTS"),
    ("ws://0.0.0.0:{port}/room", "CVI_ROOM_HOSTS"),
    ("https://daily.co/room", "CVI_ROOM_HOSTS"),
]


async def test_bot_is_not_sent_to_rooms_outside_the_allow_list(app_server: ServerFactory) -> None:
    """The real bot factory, default settings: nothing but Daily's domains. Before the check a
    loopback URL was accepted (201) and the bot opened a connection to it (SSRF)."""
    server = app_server(bot_factory="")
    async with Doorbell() as door, httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        answers = []
        for n, (template, setting) in enumerate(REFUSED_ROOMS):
            url = template.format(port=door.port)
            resp = await http.post(
                "/api/conversations",
                json={"persona": "echo", "conversation_id": f"c-room-{n}", "conversation_url": url},
                headers=AUTH,
            )
            answers.append((url, setting, resp))
        await asyncio.sleep(1.5)  # the in-process worker polls every 0.2 s
        assert door.knocks == 0, "the bot connected to a loopback address"
        for url, setting, resp in answers:
            assert resp.status_code == 400, (url, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error", error
            assert error["code"] == "room_not_allowed" and error["param"] == "conversation_url"
            assert setting in error["message"], (url, error["message"])
        # nothing was recorded for a refused room
        assert (await http.get("/api/conversations/c-room-0", headers=AUTH)).status_code == 404


async def test_allowed_rooms_and_local_rooms_when_configured(
    app_server: ServerFactory, fake_tavus: FakeTavus
) -> None:
    """Daily's URLs are accepted by default; a loopback room only with CVI_LOCAL_ROOMS; other
    hosts with CVI_ROOM_HOSTS. A conversation_url Tavus hands back is held to the same rule."""
    default = app_server()
    local = app_server(local_rooms=True, bot_factory="")
    listed = app_server(room_hosts_raw="*.daily.co, rooms.example.com")
    async with Doorbell() as door, httpx.AsyncClient(timeout=15) as http:
        ok = await http.post(
            default.url + "/api/conversations",
            json={
                "persona": "echo",
                "conversation_id": "c-daily",
                "conversation_url": "https://tavus.daily.co/c-daily",
            },
            headers=AUTH,
        )
        assert ok.status_code == 201, ok.text
        assert (await bot_for("c-daily")).url == "https://tavus.daily.co/c-daily"

        fake_tavus.conversation_url = f"ws://127.0.0.1:{door.port}/from-tavus"
        made = await http.post(
            default.url + "/api/conversations", json={"persona": "echo"}, headers=AUTH
        )
        assert made.status_code == 201, made.text
        assert made.json()["bot"]["requested"] is False
        assert "CVI_LOCAL_ROOMS" in made.json()["bot"]["refused"]
        fake_tavus.conversation_url = None

        other = await http.post(
            listed.url + "/api/conversations",
            json={
                "persona": "echo",
                "conversation_id": "c-listed",
                "conversation_url": "wss://rooms.example.com/r1",
            },
            headers=AUTH,
        )
        assert other.status_code == 201, other.text
        assert (await bot_for("c-listed")).url == "wss://rooms.example.com/r1"

        assert door.knocks == 0
        # the control: with local rooms allowed, the real bot does knock (so the test above
        # would have seen it)
        resp = await http.post(
            local.url + "/api/conversations",
            json={
                "persona": "echo",
                "conversation_id": "c-local",
                "conversation_url": f"ws://127.0.0.1:{door.port}/room",
            },
            headers=AUTH,
        )
        assert resp.status_code == 201, resp.text

        async def knocked() -> bool:
            return door.knocks > 0

        await eventually(knocked)


async def test_worker_refuses_a_lease_for_a_room_outside_the_allow_list(
    app_server: ServerFactory, tmp_path: Path
) -> None:
    """A lease row written by an older version (or by hand) is checked again by the worker
    before any bot is built: finished, noted as `worker.refused`, never joined."""
    server = app_server(bot_factory="")
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}")
    try:
        async with Doorbell() as door, httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            await store.upsert_conversation("c-old", persona="echo")
            await Leases(store).offer(
                "c-old", {"conversation_url": f"ws://127.0.0.1:{door.port}/room"}
            )

            async def refused() -> list[dict[str, Any]]:
                resp = await http.get("/api/conversations/c-old/events", headers=AUTH)
                return [e for e in resp.json()["data"] if e["kind"] == "worker.refused"]

            [note] = await eventually(refused)
            assert "CVI_LOCAL_ROOMS" in note["payload"]["error"]
            assert await Leases(store).get("c-old") is None, "the lease is finished, not retried"
            await asyncio.sleep(0.5)
            assert door.knocks == 0
    finally:
        await store.aclose()
