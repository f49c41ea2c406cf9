"""The chat-completions endpoint through the real openai SDK and raw HTTP, on real uvicorn."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from cvi_agent.protocol.chat import ChatCompletionChunk
from tests.support import API_KEY, ServerFactory, load_fixture

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments skipped)."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    return events


async def test_stream_exact_openai_shape(server: LoopbackServer) -> None:
    body = {
        "model": "echo",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello there my friend"}],
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "echo"
        assert chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "hello there my friend"
    assert len(chunks) > 2, "replies stream in several chunks"


async def test_stream_through_openai_sdk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="echo", stream=True, messages=[{"role": "user", "content": "testing one two three"}]
    )
    parts = []
    finish = None
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == "testing one two three"
    assert finish == "stop"


async def test_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "just once"}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "just once"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_alias_without_v1(server: LoopbackServer) -> None:
    async with openai.AsyncOpenAI(base_url=server.url, api_key=API_KEY, max_retries=0) as c:
        completion = await c.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "alias works"}]
        )
    assert completion.choices[0].message.content == "alias works"


async def test_streamed_tool_calls_reassemble(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    args_a = json.dumps({"location": "San Francisco, CA", "unit": "fahrenheit"})
    args_b = json.dumps({"location": "Istanbul"})
    upstream.push(
        Plan(
            steps=[
                ReplyStep(content="Let me check. "),
                ReplyStep(tool_name="get_current_weather", tool_id="call_a"),
                ReplyStep(tool_arguments=args_a[:10]),
                ReplyStep(tool_arguments=args_a[10:]),
                ReplyStep(tool_name="get_current_weather", tool_id="call_b"),
                ReplyStep(tool_arguments=args_b[:5]),
                ReplyStep(tool_arguments=args_b[5:]),
            ],
            finish_reason="tool_calls",
        )
    )
    stream = await client.chat.completions.create(
        model="weather",
        stream=True,
        messages=[{"role": "user", "content": "weather in SF and Istanbul?"}],
        tools=[WEATHER_TOOL],  # as Tavus sends the persona's client tools
    )
    calls: dict[int, dict[str, str]] = {}
    content = []
    finish = None
    async with stream:
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] = tc.function.name or call["name"]
                    call["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == "Let me check. "
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert calls[0]["id"] == "call_a" and calls[1]["id"] == "call_b"
    assert json.loads(calls[0]["arguments"]) == json.loads(args_a)
    assert json.loads(calls[1]["arguments"]) == json.loads(args_b)
    # the upstream saw the request's tool and the persona's server tool
    sent_tools = {t["function"]["name"] for t in upstream.records[-1].body["tools"]}
    assert sent_tools == {"get_current_weather", "get_current_time"}


async def test_request_tools_are_client_tools(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(
        Plan(
            steps=[
                ReplyStep(tool_name="book_table", tool_id="call_x"),
                ReplyStep(tool_arguments='{"n": 2}'),
            ]
        )
    )
    extra_tool = {
        "type": "function",
        "function": {"name": "book_table", "parameters": {"type": "object", "properties": {}}},
    }
    completion = await client.chat.completions.create(
        model="storyteller",
        tools=[extra_tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "book a table for two"}],
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "book_table" and json.loads(call.function.arguments) == {"n": 2}  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert {t["function"]["name"] for t in upstream.records[-1].body["tools"]} == {"book_table"}


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        (
            {},
            {"model": "echo", "messages": [{"role": "user", "content": "x"}]},
            401,
            "missing_api_key",
        ),
        (
            {"Authorization": "Bearer wrong"},
            {"model": "echo", "messages": [{"role": "user", "content": "x"}]},
            401,
            "invalid_api_key",
        ),
        (
            {"Authorization": "Basic abc"},
            {"model": "echo", "messages": [{"role": "user", "content": "x"}]},
            401,
            "missing_api_key",
        ),
        (
            AUTH,
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
        ),
        (AUTH, {"model": "echo"}, 400, "invalid_request"),
        (AUTH, {"model": "echo", "messages": []}, 400, "invalid_request"),
        (AUTH, {"model": "echo", "messages": "hello"}, 400, "invalid_request"),
        (
            AUTH,
            {"model": "echo", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "invalid_request",
        ),
        (
            AUTH,
            {"model": 5, "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request",
        ),
        (
            AUTH,
            {"model": "echo", "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request",
        ),
        (
            AUTH,
            {"model": "echo", "temperature": 9, "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request",
        ),
        (
            AUTH,
            {
                "model": "echo",
                "tools": [{"type": "function"}],
                "messages": [{"role": "user", "content": "x"}],
            },
            400,
            "invalid_request",
        ),
        (AUTH, [1, 2, 3], 400, "invalid_json"),
    ],
)
async def test_error_cases(
    server: LoopbackServer, headers: dict[str, str], body: Any, status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["message"]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (
            b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            "invalid_json",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    ],
)
async def test_malformed_bodies(server: LoopbackServer, content: bytes, code: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post(
            "/chat/completions",
            content=content,
            headers={**AUTH, "content-type": "application/json"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == code


async def test_body_too_large(serve: ServerFactory, upstream: FakeUpstream) -> None:
    srv = serve(upstream, max_body_bytes=10_000)
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 20_000}]}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        resp = await http.post("/v1/chat/completions", json=big, headers=AUTH)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "body_too_large"

        async def chunked() -> Any:
            for _ in range(20):
                yield b"x" * 1000

        resp = await http.post("/v1/chat/completions", content=chunked(), headers=AUTH)
        assert resp.status_code == 413


async def test_sdk_error_types(client: openai.AsyncOpenAI, server: LoopbackServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "x"}]
        )
    assert not_found.value.code == "model_not_found"
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x"}]
            )


async def test_x_api_key_header(server: LoopbackServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "key in x-api-key"}]},
            headers={"x-api-key": API_KEY},
        )
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "key in x-api-key"


async def test_models_and_health(server: LoopbackServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        models = await http.get("/v1/models", headers=AUTH)
        assert models.status_code == 200
        ids = {m["id"] for m in models.json()["data"]}
        assert {"storyteller", "weather", "interviewer", "echo", "concierge"} <= ids
        assert models.json()["object"] == "list"
        assert (await http.get("/v1/models")).status_code == 401
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        missing = await http.get("/nothing-here", headers=AUTH)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        # without a key, an unknown path is refused like a known one (security.py)
        assert (await http.get("/nothing-here")).status_code == 401


@pytest.mark.parametrize("header", ["conversation_id", "Conversation-Id", "X-CONVERSATION-ID"])
async def test_conversation_id_header_reaches_brain(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Any, header: str
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "who.yaml").write_text(
        "name: who\npersona_name: Who\nbrain: {kind: flow}\n"
        "flow: {fallback: 'conversation {conversation_id}'}\n"
    )
    srv = serve(upstream, personas_dir=personas)
    # h11 refuses underscores in header names, so send raw bytes over a socket for that case.
    body = json.dumps({"model": "who", "messages": [{"role": "user", "content": "hi"}]}).encode()
    import asyncio

    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n{header}: c123abc\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + body
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    assert b"200 OK" in response.split(b"\r\n")[0]
    payload = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert payload["choices"][0]["message"]["content"] == "conversation c123abc"


async def test_tavus_fixture_answered_by_every_persona(client: openai.AsyncOpenAI) -> None:
    request = load_fixture("chat_request_tavus.json")
    models = await client.models.list()
    names = [m.id for m in models.data]
    assert len(names) >= 5
    for name in names:
        stream = await client.chat.completions.create(**{**request, "model": name})
        text = []
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
        assert "".join(text).strip(), f"persona {name} gave an empty reply"


async def test_models_retrieve(client: openai.AsyncOpenAI, server: LoopbackServer) -> None:
    """Fails before: `GET /v1/models/{id}` was a 404 for every id."""
    model = await client.models.retrieve("concierge")
    assert (model.id, model.object, model.owned_by) == ("concierge", "model", "cvi-agent")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("ghost")
    assert missing.value.code == "model_not_found"
    body = missing.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    assert body["type"] == "invalid_request_error"
    async with httpx.AsyncClient(base_url=server.url) as http:
        plain = await http.get("/models/echo", headers=AUTH)  # base_url without /v1
        assert plain.status_code == 200 and plain.json()["id"] == "echo"
        assert (await http.get("/v1/models/echo")).status_code == 401


async def test_system_fingerprint_on_chunks_and_completions(client: openai.AsyncOpenAI) -> None:
    """Fails before: no `system_fingerprint` anywhere."""
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "fingerprint"}]
    )
    fp = completion.system_fingerprint
    assert fp is not None and fp.startswith("fp_") and len(fp) == 13
    stream = await client.chat.completions.create(
        model="echo",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "fingerprint again"}],
    )
    async with stream:
        seen = {chunk.system_fingerprint async for chunk in stream}
    assert seen == {fp}, "the same on every chunk, the usage chunk included"
    other = await client.chat.completions.create(
        model="concierge", messages=[{"role": "user", "content": "hello"}]
    )
    assert other.system_fingerprint not in (None, fp), "each persona's configuration has its own"


@pytest.mark.parametrize("model", ["echo", "concierge"])
async def test_prompt_tokens_estimated_without_a_model(
    client: openai.AsyncOpenAI, model: str
) -> None:
    """Fails before: a flow persona reported `prompt_tokens: 0`."""
    short = [{"role": "user", "content": "hello"}]
    long = [{"role": "system", "content": "word " * 400}, *short]
    usages = []
    for messages in (short, long):
        completion = await client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        assert completion.usage is not None
        usages.append(completion.usage)
    assert 0 < usages[0].prompt_tokens < 20
    assert usages[1].prompt_tokens > usages[0].prompt_tokens + 400  # ~4 characters a token
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
