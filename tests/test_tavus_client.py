"""The Tavus client against the fake Tavus API on loopback (documented shapes, real HTTP)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.tavus import FakeTavus, JsonPatchError, apply_json_patch
from cvi_agent.personas import load_personas
from cvi_agent.tavus.client import (
    APP_MESSAGE_MAX_BYTES,
    TavusAuthError,
    TavusBadRequest,
    TavusClient,
    TavusConversationEnded,
    TavusDeliveryUncertain,
    TavusNotConfigured,
    TavusNotDelivered,
    TavusNotFound,
    TavusPayloadTooLarge,
    TavusRateLimited,
    TavusUnavailable,
    json_patch,
    parse_retry_after,
)
from cvi_agent.tavus.ratelimit import RateLimiter, RateLimitTimeout
from tests.support import PERSONAS

KEY = "tavus-secret-key-0123456789"


@pytest.fixture
def tavus() -> Iterator[FakeTavus]:
    fake = FakeTavus(api_key=KEY)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


def client(fake: FakeTavus, key: str = KEY, **kw: object) -> TavusClient:
    options: dict[str, object] = {"backoff": 0.01, "max_backoff": 1.0}
    options.update(kw)
    return TavusClient(key, fake.url, **options)  # type: ignore[arg-type]


async def test_push_persona_creates_then_patches(tavus: FakeTavus) -> None:
    personas = load_personas(PERSONAS)
    weather = personas["weather"]
    async with client(tavus) as api:
        first = await api.push_persona(weather, "https://agent.example", "llm-key-1", "r123")
        assert first.created and first.persona_id in tavus.personas
        stored = tavus.personas[first.persona_id]
        llm = stored["layers"]["llm"]
        assert llm["base_url"] == "https://agent.example/v1"
        assert llm["model"] == "weather" and llm["api_key"] == "llm-key-1"
        assert llm["speculative_inference"] is True
        assert [t["function"]["name"] for t in llm["tools"]] == ["get_current_weather"]
        assert stored["default_replica_id"] == "r123"

        changed = weather.model_copy(update={"system_prompt": "You are terse."})
        second = await api.push_persona(changed, "https://agent.example", "llm-key-2", "r123")
    assert not second.created and second.persona_id == first.persona_id
    assert len(tavus.personas) == 1
    paths = {op["path"]: op for op in second.operations}
    assert paths["/system_prompt"] == {
        "op": "replace",
        "path": "/system_prompt",
        "value": "You are terse.",
    }
    assert paths["/layers/llm/api_key"]["value"] == "llm-key-2"  # never echoed back: re-sent
    assert "/persona_id" not in paths and "/created_at" not in paths
    [patch] = tavus.requests("PATCH")
    assert isinstance(patch.body, list) and patch.headers["x-api-key"] == KEY
    stored = tavus.personas[first.persona_id]
    assert stored["system_prompt"] == "You are terse."
    assert stored["layers"]["llm"]["api_key"] == "llm-key-2"


async def test_create_get_list_end_conversation(tavus: FakeTavus) -> None:
    async with client(tavus) as api:
        pushed = await api.push_persona(
            load_personas(PERSONAS)["echo"], "https://a.example", "k", "r1"
        )
        created = await api.create_conversation(
            {
                "persona_id": pushed.persona_id,
                "callback_url": "https://a.example/callbacks/tavus?token=t",
                "max_participants": 3,
                "require_auth": True,
            }
        )
        cid = created["conversation_id"]
        assert created["status"] == "active" and created["conversation_url"].startswith("https://")
        assert created["meeting_token"]
        assert (await api.get_conversation(cid, verbose=True))["conversation_id"] == cid
        listed = await api.list_conversations()
        assert [c["conversation_id"] for c in listed["data"]] == [cid]
        tavus.send_shutdown_on_end = False
        await api.end_conversation(cid)
        assert tavus.conversations[cid]["status"] == "ended"
        with pytest.raises(TavusBadRequest, match="already ended"):
            await api.end_conversation(cid)
        with pytest.raises(TavusNotFound):
            await api.get_conversation("cmissing")


async def test_errors_are_typed_with_tavus_messages(tavus: FakeTavus) -> None:
    async with client(tavus) as api:
        with pytest.raises(TavusBadRequest) as bad:
            await api.create_conversation({"callback_url": "x"})
        assert bad.value.status == 400
        assert bad.value.message == "persona_id or replica_id is required"
        tavus.fail_next(400, {"message": "Invalid replica_id"})
        with pytest.raises(TavusBadRequest, match="Invalid replica_id"):
            await api.create_conversation({"replica_id": "r"})
    async with client(tavus, key="wrong-key-0123456789") as api:
        with pytest.raises(TavusAuthError) as auth:
            await api.list_personas()
        assert auth.value.status == 401 and auth.value.message == "Invalid access token"
        assert "wrong-key-0123456789" not in str(auth.value) + repr(api)
    async with TavusClient("", tavus.url) as api:
        with pytest.raises(TavusNotConfigured):
            await api.list_personas()


async def test_429_then_success_honours_retry_after(
    tavus: FakeTavus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tavus.fail_next(429, {"message": "Too many requests"}, count=2, headers={"Retry-After": "0.2"})
    async with client(tavus) as api:
        started = time.monotonic()
        created = await api.create_conversation({"replica_id": "r1"})
        elapsed = time.monotonic() - started
    assert created["conversation_id"]
    assert len(tavus.requests("POST", "/v2/conversations")) == 3
    assert elapsed >= 0.4, "Retry-After was honoured"
    assert KEY not in caplog.text


async def test_retries_are_bounded_and_safe(tavus: FakeTavus) -> None:
    async with client(tavus, max_retries=2) as api:
        tavus.fail_next(429, {"error": "slow down"}, count=5, headers={"Retry-After": "0"})
        with pytest.raises(TavusRateLimited, match="slow down"):
            await api.list_personas()
        assert len(tavus.requests("GET", "/v2/personas")) == 3
        tavus.failures.clear()

        # A long Retry-After is not slept through: the caller gets it and decides.
        tavus.fail_next(429, {"error": "later"}, headers={"Retry-After": "120"})
        with pytest.raises(TavusRateLimited) as limited:
            await api.list_personas()
        assert limited.value.retry_after == pytest.approx(120)

        # A 500 on a create is not retried (it may have been created), on a GET it is.
        tavus.fail_next(500, {"error": "boom"}, count=1)
        before = len(tavus.requests("POST", "/v2/conversations"))
        with pytest.raises(TavusUnavailable, match="boom"):
            await api.create_conversation({"replica_id": "r1"})
        assert len(tavus.requests("POST", "/v2/conversations")) == before + 1
        tavus.fail_next(500, {"error": "boom"}, count=2)
        assert (await api.list_conversations())["total_count"] == 0


async def test_unreachable_tavus_is_a_clear_error() -> None:
    api = TavusClient(KEY, f"http://127.0.0.1:{free_port()}", backoff=0.01, max_retries=1)
    async with api:
        with pytest.raises(TavusUnavailable, match="cannot reach"):
            await api.list_personas()


def test_json_patch_and_retry_after() -> None:
    current = {"persona_id": "p1", "a": 1, "layers": {"llm": {"model": "x", "keep": 1}}}
    desired = {"a": 2, "layers": {"llm": {"model": "y", "tools": [1]}, "tts": {"e": "c"}}}
    ops = json_patch(current, desired)
    assert ops == [
        {"op": "replace", "path": "/a", "value": 2},
        {"op": "replace", "path": "/layers/llm/model", "value": "y"},
        {"op": "add", "path": "/layers/llm/tools", "value": [1]},
        {"op": "add", "path": "/layers/tts", "value": {"e": "c"}},
    ]
    patched = apply_json_patch(current, ops)
    assert patched["layers"]["llm"] == {"model": "y", "keep": 1, "tools": [1]}
    assert json_patch(patched, desired) == []
    with pytest.raises(JsonPatchError):
        apply_json_patch(current, [{"op": "replace", "path": "/nope/x", "value": 1}])
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# -- send-app-message -------------------------------------------------------------------------


def app_message(cid: str, text: str = "Hello") -> bytes:
    message = {
        "message_type": "conversation",
        "event_type": "conversation.echo",
        "conversation_id": cid,
        "properties": {"modality": "text", "text": text},
    }
    return json.dumps(message).encode()


def sends(tavus: FakeTavus, cid: str) -> int:
    return len(tavus.requests("POST", f"/v2/conversations/{cid}/send-app-message"))


async def test_send_app_message_delivers_in_order(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    async with client(tavus) as api:
        first = await api.send_app_message("c1", app_message("c1", "one"))
        await api.send_app_message("c1", app_message("c1", "two"))
    assert first.status == 200 and first.attempts == 1 and first.body == {"status": "delivered"}
    assert [m["properties"]["text"] for m in tavus.app_messages["c1"]] == ["one", "two"]
    [seen, _] = tavus.requests("POST", "/v2/conversations/c1/send-app-message")
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["content-type"] == "application/json"


async def test_send_app_message_waits_out_429_within_the_budget(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    tavus.fail_app_messages("rate_limited", count=2, retry_after=0.25)
    async with client(tavus) as api:
        started = time.monotonic()
        sent = await api.send_app_message("c1", app_message("c1"), budget=5)
        elapsed = time.monotonic() - started
        assert sent.attempts == 3 and elapsed >= 0.5 and sent.waited >= 0.5
        # A Retry-After longer than what is left of the budget is not waited: refused at once.
        tavus.fail_app_messages("rate_limited", retry_after=30)
        started = time.monotonic()
        with pytest.raises(TavusRateLimited, match="Too many requests") as limited:
            await api.send_app_message("c1", app_message("c1"), budget=2)
        assert time.monotonic() - started < 1.0
    assert limited.value.retry_after == pytest.approx(30)
    assert limited.value.attempts == 1
    assert len(tavus.app_messages["c1"]) == 1


async def test_send_app_message_retries_502_with_bounded_backoff(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    tavus.fail_app_messages("not_delivered", count=2)
    async with client(tavus) as api:
        sent = await api.send_app_message("c1", app_message("c1"))
        assert sent.attempts == 3 and len(tavus.app_messages["c1"]) == 1
        tavus.fail_app_messages("not_delivered", count=10)
        with pytest.raises(TavusNotDelivered, match="could not be delivered") as failed:
            await api.send_app_message("c1", app_message("c1"), max_attempts=4)
    assert failed.value.attempts == 4 and failed.value.status == 502
    assert sends(tavus, "c1") == 3 + 4


async def test_send_app_message_never_retries_a_504(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    tavus.fail_app_messages("maybe_delivered", deliver=True)
    async with client(tavus) as api:
        with pytest.raises(TavusDeliveryUncertain, match="may have been delivered") as maybe:
            await api.send_app_message("c1", app_message("c1"))
        assert maybe.value.status == 504 and maybe.value.attempts == 1
        assert sends(tavus, "c1") == 1 and len(tavus.app_messages["c1"]) == 1
        # No answer once it was sent is the same: it may have arrived.
        tavus.app_message_delay = 1.0
        with pytest.raises(TavusDeliveryUncertain, match="no answer"):
            await api.send_app_message("c1", app_message("c1"), attempt_timeout=0.3)
        assert sends(tavus, "c1") == 2


async def test_send_app_message_refusals_are_typed(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    big = app_message("c1", "x" * APP_MESSAGE_MAX_BYTES)
    async with client(tavus) as api:
        with pytest.raises(TavusPayloadTooLarge):
            await api.send_app_message("c1", big)
        assert sends(tavus, "c1") == 0, "refused before sending"
        tavus.room_gone("c1")
        with pytest.raises(TavusConversationEnded, match="no longer available") as gone:
            await api.send_app_message("c1", app_message("c1"))
        assert gone.value.status == 410
        tavus.add_conversation("c2", status="ended")
        with pytest.raises(TavusConversationEnded, match="active conversations") as ended:
            await api.send_app_message("c2", app_message("c2"))
        assert ended.value.status == 400
        with pytest.raises(TavusNotFound):
            await api.send_app_message("nope", app_message("nope"))
    async with client(tavus, key="wrong-key-0123456789") as api:
        with pytest.raises(TavusAuthError):
            await api.send_app_message("c1", app_message("c1"))
    async with TavusClient("", tavus.url) as api:
        with pytest.raises(TavusNotConfigured):
            await api.send_app_message("c1", app_message("c1"))


async def test_send_app_message_to_nowhere_is_surely_not_delivered() -> None:
    api = TavusClient(KEY, f"http://127.0.0.1:{free_port()}", backoff=0.01)
    async with api:
        with pytest.raises(TavusNotDelivered, match="cannot reach") as refused:
            await api.send_app_message("c1", app_message("c1"), max_attempts=3)
    assert refused.value.attempts == 3


async def test_keyless_stand_in_gets_no_key() -> None:
    standin = FakeTavus(api_key=None)
    with LoopbackServer(standin.app) as server:
        standin.add_conversation("sim-1")
        async with TavusClient("", server.url, keyless=True) as api:
            await api.send_app_message("sim-1", app_message("sim-1"))
    [seen] = standin.requests("POST")
    assert "x-api-key" not in seen.headers


async def test_rate_limiter_spaces_requests_per_key(tavus: FakeTavus) -> None:
    tavus.add_conversation("c1")
    limiter = RateLimiter(rate=10, burst=2)
    async with client(tavus, limiter=limiter) as api:
        started = time.monotonic()
        for _ in range(6):
            await api.send_app_message("c1", app_message("c1"))
        elapsed = time.monotonic() - started
    # 2 at once, then one every 0.1 s: 4 more take at least 0.4 s.
    assert elapsed >= 0.35, elapsed
    assert limiter.waited >= 0.35
    other = RateLimiter(rate=1, burst=1)
    await other.acquire(KEY, 0)
    with pytest.raises(RateLimitTimeout) as timeout:
        await other.acquire(KEY, 0.1)
    assert 0.5 < timeout.value.retry_after <= 1.0
    await other.acquire("another-key-0123456789", 0)  # buckets are per key
