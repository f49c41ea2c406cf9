"""The upstream brain against a fake OpenAI-compatible upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY, ServerFactory

# A live call (Tavus sends its conversation id): a failing upstream is answered with the
# persona's spoken fallback line (`on_upstream_failure` defaults to `speak` then).
LIVE_CALL: dict[str, object] = {"extra_headers": {"x-conversation-id": "c-upstream-tests"}}


async def collect(
    client: openai.AsyncOpenAI, model: str, text: str, **kw: object
) -> tuple[list[str], str | None]:
    stream = await client.chat.completions.create(
        model=model,
        stream=True,
        messages=[{"role": "user", "content": text}],
        **kw,  # type: ignore[call-overload]
    )
    parts: list[str] = []
    finish = None
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                finish = chunk.choices[0].finish_reason or finish
    return parts, finish


async def test_pass_through_chunk_by_chunk(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(upstream.reply("Once upon a time there was a fox", words_per_chunk=2))
    parts, finish = await collect(client, "storyteller", "tell me a story")
    assert parts == ["Once upon ", "a time ", "there was ", "a fox"]
    assert finish == "stop"
    sent = upstream.records[-1]
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["stream"] is True
    assert sent.body["messages"][-1] == {"role": "user", "content": "tell me a story"}
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    assert sent.body["temperature"] == 0.8 and sent.body["max_tokens"] == 300


async def test_request_parameters_override_persona(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await collect(client, "storyteller", "hi", temperature=0.1, max_tokens=42)
    body = upstream.records[-1].body
    assert body["temperature"] == 0.1 and body["max_tokens"] == 42


async def test_server_tool_round_then_speaks(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(
        Plan(
            steps=[
                ReplyStep(content="One moment. "),
                ReplyStep(tool_name="get_current_time", tool_id="call_t1"),
                ReplyStep(tool_arguments='{"timezone": '),
                ReplyStep(tool_arguments='"Europe/Istanbul"}'),
            ]
        )
    )
    # the second round is answered by the fake's default: "The tool said: <content>"
    stream = await client.chat.completions.create(
        model="weather",
        stream=True,
        messages=[{"role": "user", "content": "What time is it in Istanbul?"}],
    )
    text = []
    saw_tool_calls = False
    finish = None
    async with stream:
        async for chunk in stream:
            delta = chunk.choices[0].delta
            text.append(delta.content or "")
            saw_tool_calls |= bool(delta.tool_calls)
            finish = chunk.choices[0].finish_reason or finish
    spoken = "".join(text)
    assert not saw_tool_calls, "server tool calls are not streamed to the caller"
    assert finish == "stop"
    assert spoken.startswith("One moment. The tool said: ")
    assert "Europe/Istanbul" in spoken
    assert len(upstream.records) == 2
    second = upstream.records[1].body["messages"]
    assert second[-2]["role"] == "assistant"
    assert second[-2]["tool_calls"][0]["function"] == {
        "name": "get_current_time",
        "arguments": '{"timezone": "Europe/Istanbul"}',
    }
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "call_t1"
    result = json.loads(second[-1]["content"])
    assert result["timezone"] == "Europe/Istanbul" and "iso" in result


async def test_failing_server_tool_gives_error_result(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(
        Plan(
            steps=[
                ReplyStep(tool_name="get_current_time", tool_id="c1"),
                ReplyStep(tool_arguments='{"timezone": "Mars/Olympus"}'),
            ]
        )
    )
    parts, finish = await collect(client, "weather", "time on mars")
    assert finish == "stop"
    tool_message = upstream.records[1].body["messages"][-1]
    assert json.loads(tool_message["content"]) == {"error": "unknown time zone 'Mars/Olympus'"}
    assert "unknown time zone" in "".join(parts)


async def test_tool_rounds_are_bounded(serve: ServerFactory, upstream: FakeUpstream) -> None:
    srv = serve(upstream, max_tool_rounds=2)
    for _ in range(5):
        upstream.push(
            Plan(
                steps=[
                    ReplyStep(tool_name="get_current_time", tool_id="c"),
                    ReplyStep(tool_arguments="{}"),
                ]
            )
        )
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        _, finish = await collect(c, "weather", "loop forever", **LIVE_CALL)
    assert finish == "stop"
    assert len(upstream.records) == 3  # two tool rounds, then one final round
    assert upstream.records[-1].body["tool_choice"] == "none"


async def test_disconnect_closes_upstream_within_2s(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ", sleep=0.05) for i in range(400)]))
    body = {
        "model": "storyteller",
        "stream": True,
        "messages": [{"role": "user", "content": "long"}],
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break
            closed_at = time.monotonic()
    record = upstream.records[-1]
    deadline = time.monotonic() + 2.0
    while record.disconnected is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert record.disconnected is not None, "upstream never saw the disconnect"
    assert record.disconnected - closed_at < 2.0
    assert record.chunks_sent < 100, "the upstream stopped producing soon after the caller left"


async def test_dead_upstream_speaks_fallback(serve: ServerFactory) -> None:
    srv = serve(None, upstream_base_url="http://127.0.0.1:9/v1", upstream_connect_timeout=0.5)
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        parts, finish = await collect(c, "storyteller", "hello?", **LIVE_CALL)
    assert "".join(parts) == "Hmm, let me gather my thoughts for a second."
    assert finish == "stop"


async def test_upstream_5xx_and_slow_first_token(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    srv = serve(upstream, upstream_first_token_timeout=0.3)
    upstream.push(Plan(status=500), Plan(ttft=2.0, steps=[ReplyStep(content="too late")]))
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        parts, finish = await collect(c, "weather", "hi", **LIVE_CALL)
        assert "".join(parts) == "Sorry, give me one second." and finish == "stop"
        started = time.monotonic()
        parts, finish = await collect(c, "weather", "hi again", **LIVE_CALL)
        assert "".join(parts) == "Sorry, give me one second." and finish == "stop"
        assert time.monotonic() - started < 1.5


async def test_mid_stream_reset_ends_cleanly(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ") for i in range(10)], reset_after=3))
    parts, finish = await collect(client, "storyteller", "go", **LIVE_CALL)
    assert parts == ["w0 ", "w1 ", "w2 "]
    assert finish == "stop"
