"""Property-based fuzzing of everything a stranger (or a confused client) can send us.

Targets: `/v1/chat/completions`, `/callbacks/tavus`, `/api/conversations…` (list, get, events,
create, interactions, end), `/api/simulations`, the live websocket, and the room events a
`ConversationBot` receives. Properties: never a 5xx, every error in the OpenAI shape with a 4xx
we document, every 200 stream ends with `[DONE]`, the server's memory stays bounded, and a
bot fed garbage keeps running and still records the next valid utterance.

The bulk runs in process (`httpx.ASGITransport` on one event loop, the app's lifespan driven
by hand) for speed; a smaller set (chat completions with callbacks, the live websocket) goes
to `cvi-agent serve` run as its own process on loopback, whose memory is measured apart from
this process's (hypothesis keeps much of what it generates, so this process's RSS says little
about ours). Hypothesis is derandomized with no example database, so a CI run
is reproducible; the case counts are the `max_examples` below.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import string
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Message
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from cvi_agent.app import create_app
from cvi_agent.bot.session import ConversationBot
from cvi_agent.devtools.fakes.replica import ScriptedPeer
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.personas import load_persona
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.store import SqlStore
from tests.procs import ServerProcess
from tests.support import (
    API_KEY,
    PERSONAS,
    TAVUS_KEY,
    create_pg_database,
    drop_pg_database,
    make_settings,
)

# Thousands of generated cases: minutes, not seconds.
pytestmark = pytest.mark.slow

TOKEN = "cb-token-fuzz-0123456789"
AUTH = {"x-api-key": API_KEY}
TARGET = "fuzz-target-1"  # a conversation that exists (created in the harness, no bot)
SERVER_RSS_BOUND = 40 * 1024 * 1024  # the server process, once warm
TARGET_BODY = {
    "persona": "echo",
    "conversation_url": "ws://127.0.0.1:9/r",
    "conversation_id": TARGET,
    "bot": False,
}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)


# -- strategies ----------------------------------------------------------------------------------

TRICKY_TEXT = [
    "",
    " ",
    "\x00",
    "null",
    "é\u202e",
    "🙂🙂",
    "%s%n{0}",
    "a" * 300,
    "\ud800",  # lone surrogates: valid Python strings, not valid Unicode
    "x\udfffy",
    "\r\n\t",
]
texts = st.one_of(st.text(max_size=30), st.sampled_from(TRICKY_TEXT))
ints = st.one_of(
    st.integers(-(2**16), 2**16),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, 2**64]),
)
# Cheap junk for "the wrong type in this field" (hypothesis draws a sampled value fast).
JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -1e308,
    2**64,
    10**30,
    "",
    "x" * 1000,
    "\ud800",
    [],
    {},
    [None],
    [[[]]],
    {"a": {"b": [1, "2", None]}},
    {"": ""},
]
junk = st.sampled_from(JUNK)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4))


json_values = st.recursive(scalars, _containers, max_leaves=8)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's plausible values, or a value of the wrong type."""
    return st.one_of(strategy, junk)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.api+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "text/html; charset=latin-1",
    "application/octet-stream",
    "garbage",
    "",
    None,
]
header_text = (
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:/ ", min_size=1, max_size=300)
    .map(str.strip)
    .filter(bool)
)


@st.composite
def bodies(draw: st.DrawFn, value: st.SearchStrategy[Any]) -> bytes:
    """A request body: the value as JSON (sometimes corrupted), or raw garbage."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.sampled_from([b"", b" ", b"{", b"null", b"[]", b"\xff\xfe{}", b"{}" * 3]))
    if kind == 2:
        depth = draw(st.sampled_from([64, 500, 999, 1001, 5000, 100_000]))
        inner = nested(depth)
        return draw(
            st.sampled_from(
                [
                    inner.encode(),
                    ('{"model": "echo", "messages": ' + inner + "}").encode(),
                    ('{"a": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode(),
                ]
            )
        )
    encoded = json.dumps(draw(value), allow_nan=draw(st.booleans())).encode()
    if kind == 3 and encoded:
        cut = draw(st.integers(0, len(encoded)))
        return encoded[:cut] + draw(st.binary(max_size=3)) + encoded[cut + 1 :]
    return encoded


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    result = dict(AUTH)
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        result["content-type"] = content_type
    if draw(st.booleans()):
        name = draw(st.sampled_from(["conversation_id", "conversation-id", "x-conversation-id"]))
        result[name] = draw(header_text)
    if draw(st.integers(0, 9)) == 0:
        result["idempotency-key"] = draw(header_text)
    return result


MODELS = ["echo", "interviewer", "concierge", "storyteller", "weather", "recap", "nope", ""]
roles = maybe(st.sampled_from(["system", "user", "assistant", "tool", "developer", "function"]))
contents = st.one_of(
    texts,
    st.lists(
        st.fixed_dictionaries(
            {"type": maybe(st.sampled_from(["text", "image_url"])), "text": maybe(texts)}
        ),
        max_size=3,
    ),
    json_values,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": maybe(texts),
            "type": maybe(st.just("function")),
            "function": maybe(
                st.fixed_dictionaries({"name": maybe(texts), "arguments": maybe(texts)})
            ),
        }
    ),
    max_size=2,
)
messages = st.fixed_dictionaries(
    {"role": roles, "content": contents},
    optional={"name": maybe(texts), "tool_calls": maybe(tool_calls), "tool_call_id": texts},
)
tool_names = st.one_of(
    st.sampled_from(["get_current_weather", "get_current_time", "create_video", "x" * 65]), texts
)
tools = st.fixed_dictionaries(
    {
        "type": maybe(st.just("function")),
        "function": maybe(
            st.fixed_dictionaries(
                {"name": maybe(tool_names)},
                optional={"description": maybe(texts), "parameters": json_values},
            )
        ),
    }
)
chat_requests = st.fixed_dictionaries(
    {
        "model": maybe(st.sampled_from(MODELS)),
        "messages": st.one_of(st.lists(messages, min_size=1, max_size=5), json_values),
    },
    optional={
        "stream": maybe(st.booleans()),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
        "tools": maybe(st.lists(tools, max_size=3)),
        "tool_choice": maybe(st.sampled_from(["auto", "none", "required"])),
        "temperature": maybe(st.floats(-1, 3)),
        "max_tokens": maybe(ints),
        "user": maybe(texts),
        "extra": json_values,
    },
)

CALLBACK_TYPES = [
    "system.replica_joined",
    "system.shutdown",
    "application.transcription_ready",
    "application.recording_ready",
    "application.perception_analysis",
    "application.post_call_action_executed",
    "something.new",
]
callback_properties = st.fixed_dictionaries(
    {},
    optional={
        "replica_id": maybe(texts),
        "shutdown_reason": maybe(texts),
        "transcript": maybe(
            st.lists(
                st.fixed_dictionaries({"role": maybe(texts), "content": maybe(texts)}), max_size=3
            )
        ),
        "analysis": json_values,
        "bucket_name": maybe(texts),
        "s3_key": maybe(texts),
        "duration": maybe(ints),
    },
)
callbacks = st.one_of(
    st.fixed_dictionaries(
        {"event_type": maybe(st.sampled_from(CALLBACK_TYPES))},
        optional={
            "conversation_id": maybe(st.sampled_from([TARGET, "c-fuzz", ""])),
            "message_type": maybe(st.sampled_from(["system", "application"])),
            "timestamp": maybe(st.sampled_from(["2025-01-01T00:00:00Z", "1700000000", "x"])),
            "properties": maybe(callback_properties),
            "webhook_url": maybe(st.just(f"https://x.example/callbacks/tavus?token={TOKEN}")),
        },
    ),
    st.fixed_dictionaries(  # video callbacks
        {"video_id": maybe(texts)},
        optional={
            "status": maybe(st.sampled_from(["queued", "generating", "ready", "error", "deleted"])),
            "download_url": maybe(texts),
            "hosted_url": maybe(texts),
        },
    ),
    st.fixed_dictionaries(  # replica callbacks
        {"replica_id": maybe(texts)}, optional={"status": maybe(texts)}
    ),
    json_values,
)

create_requests = st.fixed_dictionaries(
    {},
    optional={
        "persona": maybe(st.sampled_from(MODELS)),
        "persona_id": maybe(texts),
        "replica_id": maybe(texts),
        "conversation_name": maybe(texts),
        "conversational_context": maybe(texts),
        "custom_greeting": maybe(texts),
        "test_mode": maybe(st.booleans()),
        "require_auth": maybe(st.booleans()),
        "max_participants": maybe(ints),
        "properties": json_values,
        "bot": maybe(st.booleans()),
        "conversation_url": maybe(
            st.sampled_from(["ws://127.0.0.1:9/r", "https://x.daily.co/r", "ftp://x", ""])
        ),
        "conversation_id": maybe(st.sampled_from(["c-fuzz", "c fuzz", "a" * 129])),
        "meeting_token": maybe(texts),
    },
)
interactions = st.fixed_dictionaries(
    {
        "type": maybe(
            st.sampled_from(
                [
                    "echo",
                    "respond",
                    "interrupt",
                    "overwrite_context",
                    "append_context",
                    "sensitivity",
                    "tool_result",
                    "echo_audio",
                ]
            )
        )
    },
    optional={
        "text": maybe(texts),
        "context": maybe(texts),
        "job_status": maybe(texts),
        "pause": maybe(st.sampled_from(["low", "medium", "high"])),
        "interrupt": maybe(st.sampled_from(["low", "medium", "high"])),
        "participant_pause_sensitivity": maybe(texts),
        "tool_call_id": maybe(texts),
        "output": maybe(texts),
        "status": maybe(st.sampled_from(["success", "error"])),
        "audio": maybe(texts),
        "sample_rate": maybe(ints),
    },
)
simulations = st.fixed_dictionaries(
    {},
    optional={
        "persona": maybe(st.sampled_from(MODELS)),
        "linger": maybe(st.floats(-1, 700)),
        "words_per_second": maybe(st.floats(-1, 2000)),
    },
)
conversation_ids = st.one_of(
    st.sampled_from([TARGET, "missing", "a" * 5000, "%00", "\x00", "a\x00b", "..", "%2e%2e%2f"]),
    st.text(alphabet=string.printable, min_size=1, max_size=40),
)


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


query_values = st.one_of(
    header_text,
    ints.map(str),
    st.sampled_from(["", "-1", "1e999", "NaN", "0x10", "１"]),
)


# -- the in-process harness ----------------------------------------------------------------------


class Harness:
    """The app on one private event loop: its lifespan driven by hand, requests through
    `httpx.ASGITransport`. Sync methods, so plain hypothesis tests can call it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.runner = asyncio.Runner()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9", timeout=30
        )
        self._startup: asyncio.Event | None = None
        self._shutdown: asyncio.Event | None = None
        self._lifespan: asyncio.Task[None] | None = None
        self.runner.run(self._start())

    async def _start(self) -> None:
        started, stop = asyncio.Event(), asyncio.Event()
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "lifespan.startup"}
            await stop.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(message.get("message"))
            if message["type"] == "lifespan.startup.complete":
                started.set()

        self._shutdown = stop
        self._lifespan = asyncio.create_task(self.app({"type": "lifespan"}, receive, send))
        await asyncio.wait_for(started.wait(), 30)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.runner.run(self.client.request(method, url, **kw))

    def close(self) -> None:
        async def stop() -> None:
            await self.client.aclose()
            assert self._shutdown is not None and self._lifespan is not None
            self._shutdown.set()
            await asyncio.wait_for(self._lifespan, 30)

        try:
            self.runner.run(stop())
        finally:
            self.runner.close()


@pytest.fixture(scope="module")
def fake_tavus_module() -> Iterator[FakeTavus]:
    fake = FakeTavus(api_key=TAVUS_KEY)
    with LoopbackServer(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, fake_tavus_module: FakeTavus
) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = make_settings(
        tmp,
        callback_token=TOKEN,
        run_worker=False,
        tavus_api_key=TAVUS_KEY,
        tavus_api_url=fake_tavus_module.url,
        public_url="http://127.0.0.1:9",  # nothing listens: callbacks the fake sends go nowhere
        side_effect_settle=0,
        replay_grace=0,
        rate_limit_rps=0,
        max_body_bytes=256 * 1024,
        callback_max_bytes=256 * 1024,
        upstream_connect_timeout=0.5,
        local_rooms=True,  # so attaching a ws:// room and /api/simulations are accepted too
    )
    h = Harness(create_app(settings_))
    resp = h.request("POST", "/api/conversations", json=TARGET_BODY, headers=AUTH)
    assert resp.status_code == 201, resp.text
    yield h
    h.close()


def check_error(resp: httpx.Response, allowed: set[int]) -> None:
    """A 4xx we document, in the OpenAI error shape; never a 5xx."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert resp.status_code in allowed, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "code", "param"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# The fuzzed servers' upstream is dead: an upstream persona asked without a conversation id
# answers that outage with an OpenAI 5xx (`on_upstream_failure: error`, llm/failure.py), the
# one 5xx the chat endpoint documents.
UPSTREAM_OUTAGE = {502: "upstream_error", 503: "upstream_unavailable", 504: "upstream_timeout"}


def check_chat(resp: httpx.Response, stream: bool) -> None:
    if resp.status_code in UPSTREAM_OUTAGE:
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
        assert body["error"]["code"] == UPSTREAM_OUTAGE[resp.status_code], body
        assert resp.headers["x-cvi-fallback"] == body["error"]["code"]
        return
    check_error(resp, {200, 400, 404, 413, 415})
    if resp.status_code != 200:
        return
    if stream:
        assert resp.text.endswith("data: [DONE]\n\n"), resp.text[-300:]
        for event in resp.text.split("\n\n"):
            if event.startswith("data: {"):
                chunk = json.loads(event[6:])
                assert chunk["object"] == "chat.completion.chunk"
    else:
        body = resp.json()
        assert body["object"] == "chat.completion" and body["choices"]


@pytest.fixture(scope="module")
def quiet(harness: Harness) -> Iterator[None]:
    """Warnings silenced while fuzzing: thousands of expected rejections would fill the log,
    and pytest keeps every captured record (tracebacks and their frames included)."""
    loggers = [logging.getLogger(name) for name in ("cvi_agent", "httpx", "uvicorn")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


# -- the LLM endpoint ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=1500)
@given(body=bodies(chat_requests), hdrs=headers(), path=st.sampled_from(["/v1", ""]))
def test_fuzz_chat_completions(
    harness: Harness, quiet: None, body: bytes, hdrs: dict[str, str], path: str
) -> None:
    try:
        stream = json.loads(body).get("stream") is True
    except (ValueError, AttributeError, RecursionError):
        stream = False
    resp = harness.request("POST", path + "/chat/completions", content=body, headers=hdrs)
    check_chat(resp, stream)


def test_chat_completions_edge_cases(harness: Harness, quiet: None) -> None:
    """The inputs a fuzzer finds slowly: limits, nesting, encodings, content types."""
    valid = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    raw = json.dumps(valid).encode()
    cases: list[tuple[bytes, dict[str, str], int]] = [
        (raw, {}, 200),  # no content type: a valid JSON body is served
        (raw, {"content-type": "text/plain"}, 200),  # ditto (curl -d without -H)
        (b"model=echo&messages=hi", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b"--x\r\n\r\n", {"content-type": "multipart/form-data; boundary=x"}, 415),
        (b"hello", {"content-type": "text/plain"}, 415),
        (b"hello", {"content-type": "application/json"}, 400),
        (b"hello", {}, 400),
        (b"", {"content-type": "application/json"}, 400),
        (b"\xff\xfe\x00", {"content-type": "application/json"}, 400),
        (b'{"model": "echo\xed\xa0\x80", "messages": []}', {}, 400),  # UTF-8-encoded surrogate
        (b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
        (
            b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}',
            {},
            200,
        ),
        (b'{"model": "echo", "messages": [{"role": "user", "content": "a\\u0000b"}]}', {}, 200),
        (b'{"model": "echo", "temperature": NaN, "messages": []}', {}, 400),
        (b'{"model": "echo", "x": -Infinity, "messages": [{"role": "user"}]}', {}, 400),
        (b'{"model": "echo", "x": 1e400, "messages": [{"role": "user"}]}', {}, 400),
        (b'{"model": "echo", "x": 1e300, "messages": [{"role": "user"}]}', {}, 200),
        (b"x" * (256 * 1024 + 1), {}, 413),
        (
            json.dumps(
                {**valid, "messages": [{"role": "user"}] * 10_001}, separators=(",", ":")
            ).encode(),
            {},
            400,
        ),
        (json.dumps({**valid, "messages": [{"role": "user"}] * 5000}).encode(), {}, 200),
        (
            json.dumps(
                {**valid, "tools": [{"type": "function", "function": {"name": "bad name"}}]}
            ).encode(),
            {},
            400,
        ),
        (
            json.dumps(
                {
                    **valid,
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
                }
            ).encode(),
            {},
            400,
        ),
        (json.dumps({**valid, "tools": {"a": 1}}).encode(), {}, 400),
        (json.dumps({**valid, "stream": "yes"}).encode(), {}, 400),
    ]
    for depth in (10, 100, 900, 999, 1000, 5000, 100_000):
        cases.append(
            (
                (
                    '{"model": "echo", "messages": [{"role": "user", "content": "x", "deep": '
                    + nested(depth)
                    + "}]}"
                ).encode(),
                {},
                0,
            )
        )
        cases.append((nested(depth).encode(), {}, 400))
    for path in ("/api/conversations/%00", "/api/conversations?cursor=%00", "/healthz?x=%00"):
        resp = harness.request("GET", path, headers=AUTH)
        check_error(resp, {400})
        assert resp.json()["error"]["code"] == "invalid_url"
    for body, extra, expected in cases:
        resp = harness.request(
            "POST", "/v1/chat/completions", content=body, headers={**AUTH, **extra}
        )
        check_chat(resp, stream=False)
        if expected:
            assert resp.status_code == expected, (body[:80], extra, resp.status_code, resp.text)


# -- callbacks -----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(body=bodies(callbacks), content_type=st.sampled_from(CONTENT_TYPES))
def test_fuzz_tavus_callbacks(
    harness: Harness, quiet: None, body: bytes, content_type: str | None
) -> None:
    hdrs = {"content-type": content_type} if content_type is not None else {}
    resp = harness.request(
        "POST", "/callbacks/tavus", params={"token": TOKEN}, content=body, headers=hdrs
    )
    check_error(resp, {200, 400, 413, 415})


# -- the API -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(
    limit=st.one_of(st.none(), query_values),
    cursor=st.one_of(st.none(), query_values, json_values.map(cursor_of)),
)
def test_fuzz_list_conversations(
    harness: Harness, quiet: None, limit: str | None, cursor: str | None
) -> None:
    params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
    resp = harness.request("GET", "/api/conversations", params=params, headers=AUTH)
    check_error(resp, {200, 400})


@settings(FUZZ, max_examples=300)
@given(
    cid=conversation_ids,
    after=st.one_of(st.none(), query_values),
    limit=st.one_of(st.none(), query_values),
    events=st.booleans(),
)
def test_fuzz_get_conversation_and_events(
    harness: Harness, quiet: None, cid: str, after: str | None, limit: str | None, events: bool
) -> None:
    path = f"/api/conversations/{quote(cid, safe='')}"
    params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
    resp = harness.request("GET", path + ("/events" if events else ""), params=params, headers=AUTH)
    # 307/405: an id like "/" or "." that the URL resolves into another route
    check_error(resp, {200, 307, 400, 404, 405})


@settings(FUZZ, max_examples=300)
@given(body=bodies(create_requests), hdrs=headers())
def test_fuzz_create_conversation(
    harness: Harness, quiet: None, body: bytes, hdrs: dict[str, str]
) -> None:
    resp = harness.request("POST", "/api/conversations", content=body, headers=hdrs)
    check_error(resp, {201, 400, 404, 413, 415})


@settings(FUZZ, max_examples=300)
@given(cid=conversation_ids, body=bodies(interactions), hdrs=headers())
def test_fuzz_interactions(
    harness: Harness, quiet: None, cid: str, body: bytes, hdrs: dict[str, str]
) -> None:
    resp = harness.request(
        "POST", f"/api/conversations/{quote(cid, safe='')}/interactions", content=body, headers=hdrs
    )
    check_error(resp, {307, 400, 404, 405, 409, 413, 415})


@settings(FUZZ, max_examples=200)
@given(cid=conversation_ids, body=st.one_of(st.just(b""), bodies(json_values)))
def test_fuzz_end_conversation(harness: Harness, quiet: None, cid: str, body: bytes) -> None:
    resp = harness.request(
        "POST", f"/api/conversations/{quote(cid, safe='')}/end", content=body, headers=AUTH
    )
    check_error(resp, {200, 307, 400, 404, 405})


@settings(FUZZ, max_examples=200)
@given(body=st.one_of(st.just(b""), bodies(simulations)), hdrs=headers())
def test_fuzz_simulations(harness: Harness, quiet: None, body: bytes, hdrs: dict[str, str]) -> None:
    resp = harness.request("POST", "/api/simulations", content=body, headers=hdrs)
    check_error(resp, {202, 400, 404, 413, 415, 429})


# -- the same on PostgreSQL (stricter than SQLite: no NUL characters, no Infinity in JSON) -------


@pytest.fixture(scope="module")
def pg_harness(
    tmp_path_factory: pytest.TempPathFactory, fake_tavus_module: FakeTavus
) -> Iterator[Harness]:
    name, url = asyncio.run(create_pg_database())
    settings_ = make_settings(
        tmp_path_factory.mktemp("fuzz-pg"),
        database_url=url,
        callback_token=TOKEN,
        run_worker=False,
        tavus_api_key=TAVUS_KEY,
        tavus_api_url=fake_tavus_module.url,
        public_url="http://127.0.0.1:9",
        rate_limit_rps=0,
    )
    h = Harness(create_app(settings_))
    resp = h.request("POST", "/api/conversations", json=TARGET_BODY, headers=AUTH)
    assert resp.status_code == 201, resp.text
    try:
        yield h
    finally:
        h.close()
        asyncio.run(drop_pg_database(name))


@pytest.mark.postgres
@settings(FUZZ, max_examples=500)
@given(
    target=st.sampled_from(["callback", "create", "interaction", "get", "list"]),
    callback=bodies(callbacks),
    create=bodies(create_requests),
    interaction=bodies(interactions),
    cid=conversation_ids,
    cursor=st.one_of(query_values, json_values.map(cursor_of)),
)
def test_fuzz_storage_on_postgresql(
    pg_harness: Harness,
    quiet: None,
    target: str,
    callback: bytes,
    create: bytes,
    interaction: bytes,
    cid: str,
    cursor: str,
) -> None:
    if target == "get":
        resp = pg_harness.request("GET", f"/api/conversations/{quote(cid, safe='')}", headers=AUTH)
        check_error(resp, {200, 307, 400, 404, 405})
    elif target == "list":
        resp = pg_harness.request(
            "GET", "/api/conversations", params={"cursor": cursor}, headers=AUTH
        )
        check_error(resp, {200, 400})
    elif target == "callback":
        resp = pg_harness.request(
            "POST", "/callbacks/tavus", params={"token": TOKEN}, content=callback
        )
        check_error(resp, {200, 400, 413})
    elif target == "create":
        resp = pg_harness.request("POST", "/api/conversations", content=create, headers=AUTH)
        check_error(resp, {201, 400, 404, 413})
    else:
        resp = pg_harness.request(
            "POST", f"/api/conversations/{TARGET}/interactions", content=interaction, headers=AUTH
        )
        check_error(resp, {400, 404, 409, 413})


# -- over real uvicorn: HTTP and the live websocket -----------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`cvi-agent serve` as its own process (SQLite, no worker), so its memory is measured
    apart from this test process's (hypothesis keeps what it generated)."""
    tmp = tmp_path_factory.mktemp("fuzz-real")
    server = ServerProcess(
        tmp,
        f"sqlite+aiosqlite:///{tmp / 'cvi.db'}",
        name="fuzz-server",
        token=TOKEN,
        env={"CVI_RUN_WORKER": "false", "CVI_SIDE_EFFECT_SETTLE": "0"},
    )
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            resp = http.post("/api/conversations", json=TARGET_BODY, headers=AUTH)
            assert resp.status_code == 201, resp.text
            server.http = http  # type: ignore[attr-defined]  # one keep-alive client for the fuzz
            yield server
        assert server.proc is not None and server.proc.poll() is None, "the server died"
        assert "Traceback" not in server.log_text(), server.log_text()[-3000:]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_memory(real_server: ServerProcess) -> Iterator[None]:
    """The server process's memory over everything fuzzed at it over HTTP and websockets,
    measured once it is warm (a few valid requests first)."""
    http = real_server.http  # type: ignore[attr-defined]
    for _ in range(20):
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    before = real_server.rss()
    yield
    grown = real_server.rss() - before
    assert grown < SERVER_RSS_BOUND, f"server RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.process
@settings(FUZZ, max_examples=500)
@given(body=bodies(chat_requests), hdrs=headers())
def test_fuzz_chat_over_a_server_process(
    real_server: ServerProcess, server_memory: None, body: bytes, hdrs: dict[str, str]
) -> None:
    try:
        stream = json.loads(body).get("stream") is True
    except (ValueError, AttributeError, RecursionError):
        stream = False
    http = real_server.http  # type: ignore[attr-defined]
    resp = http.post("/v1/chat/completions", content=body, headers=hdrs)
    check_chat(resp, stream)
    cb = http.post("/callbacks/tavus", params={"token": TOKEN}, content=body)
    check_error(cb, {200, 400, 413})


ws_messages = st.lists(
    st.one_of(
        texts.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
        st.binary(max_size=100),
    ),
    max_size=3,
)


@pytest.mark.process
@settings(FUZZ, max_examples=300)
@given(
    cid=st.one_of(
        st.just(TARGET),
        conversation_ids.filter(lambda c: "/" not in c and "?" not in c and "#" not in c),
    ),
    after=st.one_of(st.none(), query_values),
    auth=st.sampled_from(["header", "query", "bearer-proto", "key-proto", "none", "wrong"]),
    protocols=st.lists(st.sampled_from(["cvi-agent", "x", "bearer.", "key.wrong"]), max_size=2),
    send=ws_messages,
)
def test_fuzz_live_websocket(
    real_server: ServerProcess,
    server_memory: None,
    cid: str,
    after: str | None,
    auth: str,
    protocols: list[str],
    send: list[str | bytes],
) -> None:
    query: dict[str, str] = {}
    extra: dict[str, str] = {}
    offered = list(protocols)
    if after is not None:
        query["after"] = after
    if auth == "header":
        extra["Authorization"] = f"Bearer {API_KEY}"
    elif auth == "query":
        query["key"] = API_KEY
    elif auth == "bearer-proto":
        offered.append(f"bearer.{API_KEY}")
    elif auth == "key-proto":
        offered.append(f"key.{API_KEY}")
    elif auth == "wrong":
        query["key"] = "wrong"
    url = (
        real_server.url.replace("http://", "ws://")
        + f"/api/conversations/{quote(cid, safe='')}/live"
    )
    if query:
        url += "?" + urlencode(query)

    async def run() -> None:
        try:
            async with connect(
                url,
                additional_headers=extra,
                subprotocols=offered or None,  # type: ignore[arg-type]
                open_timeout=10,
            ) as ws:
                for message in send:
                    await ws.send(message)
                first = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert first["type"] in ("event", "live")
        except InvalidStatus as exc:
            status = exc.response.status_code
            assert status in (400, 401, 403, 404), (status, exc.response.body)
            if status != 403:
                assert b'"error"' in (exc.response.body or b"")
            if auth in ("none", "wrong") and "\x00" not in cid:  # a NUL is refused first (400)
                assert status == 401
        except InvalidHandshake:
            # a subprotocol we offered was not selected although the key came in another one
            assert offered
        except ConnectionClosed as exc:
            assert exc.rcvd is None or exc.rcvd.code != 1011, exc

    asyncio.run(run())


# -- the room bot --------------------------------------------------------------------------------

CONCIERGE = load_persona(PERSONAS / "concierge.yaml")
ROOM_TYPES = [
    "conversation.utterance",
    "conversation.utterance.streaming",
    "conversation.started_speaking",
    "conversation.replica.stopped_speaking",
    "conversation.tool_call",
    "conversation.perception_tool_call",
    "conversation.perception_analysis",
    "system.replica_joined",
    "conversation.whatever_new",
    "conversation-utterance",
]
room_text = st.text(max_size=60)  # no surrogates: a room transport cannot carry them
room_scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), room_text)


def _room_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4), st.dictionaries(room_text, children, max_size=4)
    )


room_values = st.recursive(room_scalars, _room_containers, max_leaves=10)


def room_maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, room_values)


room_properties = st.fixed_dictionaries(
    {},
    optional={
        "role": room_maybe(st.sampled_from(["user", "replica", "pal", "assistant"])),
        "speech": room_maybe(room_text),
        "text": room_values,
        "final": room_maybe(st.sampled_from([True, "true", "1"])),
        "is_interrupted": room_values,
        "content_index": room_values,
        "interrupted": room_values,
        "duration": room_maybe(st.sampled_from(["1.5", "nan", "inf", "1e400"])),
        "name": room_maybe(st.sampled_from(["get_current_weather", "get_current_time", ""])),
        "arguments": room_maybe(st.sampled_from(["{}", '{"location": 1}', "[", "null"])),
        "tool_call_id": room_values,
        "modality": room_values,
        "frames": room_values,
        "analysis": room_values,
    },
)
room_events = st.fixed_dictionaries(
    {"event_type": room_maybe(st.sampled_from(ROOM_TYPES))},
    optional={
        "message_type": room_values,
        "conversation_id": room_values,
        "inference_id": room_maybe(room_text),
        "seq": room_maybe(ints),
        "turn_idx": room_maybe(ints),
        "timestamp": room_maybe(st.sampled_from(["2025-01-01T00:00:00Z", "1e400", "-1"])),
        "properties": st.one_of(
            room_properties,
            room_properties.map(json.dumps),
            st.just("[" * 5000 + "]" * 5000),
            room_values,
        ),
    },
)
garbage = st.one_of(
    room_events,
    room_values,
    room_text,  # non-JSON strings (and JSON scalars in a string)
    st.sampled_from(
        [
            "{not json",
            "[" * 100_000,
            "x" * 200_000,
            json.dumps({"event_type": "conversation.utterance", "properties": "x" * 200_000}),
            '{"event_type": "conversation.utterance", "properties": '
            + "[" * 5000
            + "]" * 5000
            + "}",
            '{"event_type": "conversation.utterance", "properties": "' + "[" * 5000 + '"}',
        ]
    ),
)


@pytest.fixture
async def rooms() -> AsyncIterator[LocalRoomServer]:
    async with LocalRoomServer() as srv:
        yield srv


@settings(FUZZ, max_examples=8)
@given(stream=st.lists(garbage, min_size=40, max_size=80))
async def test_malformed_room_events_never_stop_the_bot(
    rooms: LocalRoomServer, store: SqlStore, caplog: pytest.LogCaptureFixture, stream: list[Any]
) -> None:
    """Garbage app-messages, from the replica and from a human, then one valid utterance: the
    bot is still running and records the valid one (on SQLite and PostgreSQL)."""
    import uuid

    room = "fuzz-" + uuid.uuid4().hex[:8]
    cid = "conv-fuzz-" + room
    url = rooms.room_url(room)
    replica = await ScriptedPeer(
        url, conversation_id=cid, user_name=CONCIERGE.persona_name, user_id="tavus-replica-1"
    ).join()
    human = await ScriptedPeer(url, user_name="Alice", user_id="user-alice").join()
    bot = ConversationBot(
        LocalRoom(), conversation_id=cid, store=store, persona=CONCIERGE, leave_grace=0.2
    )
    await bot.start(url)
    runner = asyncio.create_task(bot.run())
    try:
        for i, message in enumerate(stream):
            await (human if i % 5 == 4 else replica).send(message)
        marker = "still listening " + room
        await replica.say(
            "conversation.utterance", {"role": "user", "speech": marker}, inference_id="final-1"
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            assert not runner.done(), f"the bot stopped: {runner.result()!r}"
            rows = await store.list_utterances(cid)
            if any(u.intended_text == marker for u in rows):
                break
            assert loop.time() < deadline, "the valid utterance was never recorded"
            await asyncio.sleep(0.05)
        assert bot.stats.events >= len(stream) + 1
        # every message was handled by the bot itself: none blew up in the room's listener call
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not failures, failures[0].getMessage()
    finally:
        await human.leave()
        await asyncio.wait_for(runner, 20)
        await replica.leave()
