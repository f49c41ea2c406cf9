"""Tavus webhooks over real HTTP into SQLite and the real PostgreSQL: exactly once, any order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.protocol.callbacks import (
    parse_tavus_callback,
    parse_timestamp,
    shutdown_code,
    stable_hash,
)
from cvi_agent.store import Leases, UtteranceRecord, open_store
from tests.support import (
    API_KEY,
    FIXTURES,
    ServerFactory,
)

TOKEN = "cb-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONVERSATION = "c0a1b2c3d4"


def fixtures() -> dict[str, dict[str, Any]]:
    found = {
        path.stem: json.loads(path.read_text()) for path in sorted(FIXTURES.glob("callback_*.json"))
    }
    assert len(found) >= 6, f"expected the callback fixtures in {FIXTURES}"
    return found


@pytest.fixture
def cb_server(serve: ServerFactory, database_url: str) -> LoopbackServer:
    return serve(database_url=database_url, callback_token=TOKEN, run_worker=False)


async def post(http: httpx.AsyncClient, body: Any, token: str | None = TOKEN) -> httpx.Response:
    params = {"token": token} if token is not None else {}
    return await http.post("/callbacks/tavus", json=body, params=params)


async def test_every_fixture_twice_out_of_order_stored_once(
    cb_server: LoopbackServer, database_url: str
) -> None:
    payloads = fixtures()
    order = list(payloads)
    async with httpx.AsyncClient(base_url=cb_server.url, timeout=10) as http:
        first = [await post(http, payloads[name]) for name in reversed(order)]
        second = [await post(http, payloads[name]) for name in order]
        assert all(r.status_code == 200 for r in first + second), [r.text for r in first + second]
        statuses = {"stored", "accepted"}  # video deliveries are "accepted"
        assert all(r.json()["status"] in statuses for r in first)
        assert all(r.json()["status"] in {"duplicate", "accepted"} for r in second)

        resp = await http.get(f"/api/conversations/{CONVERSATION}", headers=AUTH)
        assert resp.status_code == 200, resp.text
        body = resp.json()

    # shutdown arrived before replica_joined: the conversation stays ended, with its reason
    conv = body["conversation"]
    assert conv["status"] == "ended"
    assert conv["shutdown_reason"] == "participant_left_timeout"
    assert conv["ended_at"] is not None
    assert conv["meta"]["recording"]["s3_key"] == "tavus/c0a1b2c3d4/1739222400000"
    # the transcript is readable, cleaned of Tavus's USER_SPEECH/VISUAL_SCENE wrapper
    transcript = body["transcript"]
    assert transcript["source"] == "tavus"
    entries = transcript["entries"]
    assert [e["role"] for e in entries] == ["system", "user", "assistant", "user", "assistant"]
    assert entries[3]["text"] == "Yeah I'd love to hear it."
    kinds = sorted(e["kind"] for e in body["events"])
    assert kinds == sorted(
        [
            "application.recording_ready",
            "application.transcription_ready",
            "system.replica_joined",
            "system.shutdown",
        ]
    )
    assert all(e["source"] == "callback" for e in body["events"])

    store = await open_store(database_url)
    try:
        assert await store.count_events(source="callback") == len(order) - 1
        video = await store.get_video("tavus", "1e30440cf9")
        assert video is not None and video.status == "ready"
        assert video.url == "https://stream.example.test/high.mp4?download=1e30440cf9"
        # the video callback went to the videos module (source `video`), the replica one here
        assert {e.kind for e in await store.list_events("", source="callback")} == {"replica.error"}
        assert await store.count_events(source="video") == 1
    finally:
        await store.aclose()


async def test_token_size_and_json_errors_store_nothing(
    serve: ServerFactory, tmp_path: Path
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'errors.db'}"
    server = serve(database_url=db, callback_token=TOKEN, callback_max_bytes=2048)
    body = fixtures()["callback_shutdown"]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        missing = await post(http, body, token=None)
        wrong = await post(http, body, token="nope")
        prefix = await post(http, body, token=TOKEN[:-1])
        big = await post(http, {"event_type": "x", "properties": {"blob": "a" * 5000}})
        bad = await http.post(
            "/callbacks/tavus",
            params={"token": TOKEN},
            content=b'{"event_type": ',
            headers={"content-type": "application/json"},
        )
        array = await post(http, [1, 2])
    assert (
        missing.status_code == 401 and missing.json()["error"]["code"] == "missing_callback_token"
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_callback_token"
    assert prefix.status_code == 401
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert array.status_code == 400
    store = await open_store(db)
    try:
        assert await store.count_events() == 0
    finally:
        await store.aclose()


async def test_unconfigured_token_refuses_with_503(serve: ServerFactory) -> None:
    server = serve(callback_token="")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        resp = await post(http, fixtures()["callback_shutdown"], token="anything")
    assert resp.status_code == 503
    err = resp.json()["error"]
    assert err["code"] == "callback_token_not_configured" and "CVI_CALLBACK_TOKEN" in err["message"]


async def test_rotated_tokens_unknown_kinds_and_redaction(serve: ServerFactory) -> None:
    server = serve(callback_token=f"new-token-abcdef, {TOKEN}")
    future = {
        "event_type": "system.something_new",
        "conversation_id": "cnew",
        "message_type": "system",
        "timestamp": "2025-02-10T21:15:09Z",
        "properties": {"x": 1},
        "webhook_url": f"https://us.example/callbacks/tavus?token={TOKEN}&a=b",
    }
    odd = {"hello": "world"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        r1 = await post(http, future, token="new-token-abcdef")
        r2 = await post(http, odd)
        r3 = await post(http, odd)
        r4 = await post(http, {"event_type": "system.shutdown", "conversation_id": "x" * 200})
        r5 = await post(http, {"video_id": "v" * 200, "status": "ready"})
        rec = (await http.get("/api/conversations/cnew", headers=AUTH)).json()
    assert r1.json()["kind"] == "system.something_new" and r1.json()["status"] == "stored"
    assert r2.json()["kind"] == "unknown" and r2.json()["status"] == "stored"
    assert r3.json()["status"] == "duplicate"
    assert r4.status_code == 400
    assert r5.status_code == 400 and r5.json()["error"]["code"] == "invalid_callback"
    [event] = rec["events"]
    assert TOKEN not in json.dumps(event)
    assert event["payload"]["webhook_url"].startswith(
        "https://us.example/callbacks/tavus?token=***"
    )
    assert rec["conversation"]["status"] == "active"


async def test_transcript_joined_with_what_was_spoken(
    cb_server: LoopbackServer, database_url: str
) -> None:
    transcript = fixtures()["callback_transcription_ready"]
    store = await open_store(database_url)
    try:
        await store.upsert_utterances(
            [
                UtteranceRecord(
                    CONVERSATION,
                    "replica",
                    "inf-2",
                    intended_text="I've got a great one about a guy who traveled back in time. "
                    "Want to hear it?",
                    spoken_text="I've got a great one about a guy",
                    is_interrupted=True,
                    inference_id="inf-2",
                    seq=5,
                ),
                UtteranceRecord(
                    CONVERSATION, "user", "inf-1", spoken_text="Hello, tell me a story.", seq=1
                ),
            ]
        )
    finally:
        await store.aclose()
    async with httpx.AsyncClient(base_url=cb_server.url, timeout=10) as http:
        assert (await post(http, transcript)).status_code == 200
        body = (await http.get(f"/api/conversations/{CONVERSATION}", headers=AUTH)).json()
    entries = body["transcript"]["entries"]
    told = entries[2]
    assert told["role"] == "assistant"
    assert told["interrupted"] is True
    assert told["spoken_text"] == "I've got a great one about a guy"
    assert told["text"] == "I've got a great one about a guy"
    assert told["inference_id"] == "inf-2"
    assert entries[1]["interrupted"] is False and entries[1]["text"] == "Hello, tell me a story."
    assert "interrupted" not in entries[4]  # no utterance was seen for that line
    assert [u["role"] for u in body["utterances"]] == ["user", "replica"]


def test_classification_and_identity() -> None:
    payloads = fixtures()
    kinds = {name: parse_tavus_callback(p).kind for name, p in payloads.items()}
    assert kinds["callback_video_ready"] == "video.ready"
    assert kinds["callback_replica_error"] == "replica.error"
    assert kinds["callback_shutdown"] == "system.shutdown"
    a = parse_tavus_callback(payloads["callback_shutdown"])
    reordered = json.loads(json.dumps(payloads["callback_shutdown"]))
    reordered["properties"] = dict(reversed(list(reordered["properties"].items())))
    assert parse_tavus_callback(reordered).dedupe_key == a.dedupe_key
    later = dict(payloads["callback_shutdown"], timestamp="2025-02-10T21:16:00Z")
    assert parse_tavus_callback(later).dedupe_key != a.dedupe_key
    assert len(a.dedupe_key) <= 512
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})


def test_shutdown_reasons_match_by_prefix() -> None:
    assert shutdown_code("participant_left_timeout") == "participant_left_timeout"
    assert shutdown_code("participant_left_timeout reached") == "participant_left_timeout"
    assert shutdown_code("max_call_duration reached") == "max_call_duration"
    assert shutdown_code("internal error occurred at step 3") == "internal_error"
    assert shutdown_code("End_Conversation_Endpoint_Hit") == "end_conversation_endpoint_hit"
    assert shutdown_code("something else") == "other"
    assert shutdown_code(None) == "other"


def test_timestamps() -> None:
    assert parse_timestamp("2025-02-10T21:15:09.860974Z") == pytest.approx(1739222109.860974)
    assert parse_timestamp("2024-08-28 15:27:40.824457") == pytest.approx(1724858860.824457)
    assert parse_timestamp(1739222109000) == pytest.approx(1739222109.0)
    assert parse_timestamp("garbage") is None
    assert parse_timestamp(True) is None


async def test_a_callback_and_its_effects_are_one_transaction(
    cb_server: LoopbackServer, database_url: str
) -> None:
    """Under load every write transaction queues for the database's write lock (SQLite: one
    writer at a time), so a callback costs one: the delivery, the conversation's status or
    transcript, and a shutdown's lease, committed together."""
    app: Any = cb_server.server.config.app
    server_store = app.state.runtime.store  # counted here, used on the server's loop
    payloads = fixtures()
    store = await open_store(database_url)
    try:
        await Leases(store).offer(CONVERSATION, {})
        async with httpx.AsyncClient(base_url=cb_server.url, timeout=10) as http:
            for name in (
                "callback_replica_joined",
                "callback_transcription_ready",
                "callback_shutdown",
            ):
                before = server_store.commits
                resp = await post(http, payloads[name])
                assert resp.status_code == 200 and resp.json()["status"] == "stored", resp.text
                assert server_store.commits - before == 1, name
            body = (await http.get(f"/api/conversations/{CONVERSATION}", headers=AUTH)).json()
        assert body["conversation"]["status"] == "ended", body
        assert body["transcript"]["entries"]
        assert await Leases(store).get(CONVERSATION) is None
    finally:
        await store.aclose()
