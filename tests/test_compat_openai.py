"""The official OpenAI Python SDK against the server, the way an application uses it: each case
asserts what the client sees (its objects, its typed errors, its request ids), and, where a
parameter must travel, what the fake upstream received. tests/test_compat_node.py does the same
with the Node SDK."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


class Story(BaseModel):
    title: str


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


async def collect(stream: Any) -> dict[str, Any]:
    """A streamed answer reassembled the way an application would."""
    out: dict[str, Any] = {"text": "", "calls": {}, "finish": None, "usage": None, "chunks": []}
    async with stream:
        async for chunk in stream:
            out["chunks"].append(chunk)
            if chunk.usage is not None:
                out["usage"] = chunk.usage
            for choice in chunk.choices:
                out["text"] += choice.delta.content or ""
                for tc in choice.delta.tool_calls or []:
                    call = out["calls"].setdefault(
                        tc.index, {"id": "", "name": "", "arguments": ""}
                    )
                    call["id"] = tc.id or call["id"]
                    if tc.function is not None:
                        call["name"] = tc.function.name or call["name"]
                        call["arguments"] += tc.function.arguments or ""
                out["finish"] = choice.finish_reason or out["finish"]
    out["calls"] = [out["calls"][i] for i in sorted(out["calls"])]
    return out


async def test_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    seen = await collect(
        await client.chat.completions.create(
            model="echo",
            stream=True,
            stream_options={"include_usage": True},
            messages=user("stream me please"),
        )
    )
    assert seen["text"] == "stream me please" and seen["finish"] == "stop"
    chunks = seen["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1 and len({c.system_fingerprint for c in chunks}) == 1
    usage = seen["usage"]
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_non_streaming(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="echo", messages=user("plain"))
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "plain",
        "stop",
    )
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.system_fingerprint is not None


async def round_trip(
    client: openai.AsyncOpenAI, model: str, question: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A client tool's call, its result sent back in the next request, and the answer."""
    messages: list[Any] = user(question)
    first = await collect(
        await client.chat.completions.create(
            model=model, stream=True, messages=messages, tools=[WEATHER_TOOL]
        )
    )
    call = first["calls"][0]
    messages += [
        {
            "role": "assistant",
            "content": first["text"] or None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": json.dumps({"summary": "21 degrees and clear"}),
        },
    ]
    second = await collect(
        await client.chat.completions.create(
            model=model, stream=True, messages=messages, tools=[WEATHER_TOOL]
        )
    )
    return first, second


async def test_client_tool_round_trip_without_a_model(client: openai.AsyncOpenAI) -> None:
    first, second = await round_trip(client, "concierge", "What's the weather in Paris?")
    assert first["finish"] == "tool_calls" and first["text"] == "Let me check."
    assert json.loads(first["calls"][0]["arguments"]) == {"location": "Paris"}
    assert second["text"] == "Here's the weather: 21 degrees and clear"
    assert second["finish"] == "stop" and second["calls"] == []


async def test_client_tool_round_trip_through_an_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(
        Plan(
            steps=[
                ReplyStep(tool_name="get_current_weather", tool_id="call_up"),
                ReplyStep(tool_arguments='{"location": "Oslo"}'),
            ],
            finish_reason="tool_calls",
        )
    )
    first, second = await round_trip(client, "weather", "Weather in Oslo?")
    assert first["calls"] == [
        {"id": "call_up", "name": "get_current_weather", "arguments": '{"location": "Oslo"}'}
    ]
    assert first["finish"] == "tool_calls"
    assert second["text"].startswith("The tool said: ") and second["finish"] == "stop"
    assert upstream.records[-1].body["messages"][-1]["tool_call_id"] == "call_up"


@pytest.mark.parametrize(
    ("tool_choice", "question", "expect_call"),
    [
        ("none", "What's the weather in Paris?", None),
        ("required", "hello", "get_current_weather"),
        (
            {"type": "function", "function": {"name": "get_current_weather"}},
            "What time is it in Asia/Tokyo?",
            "get_current_weather",
        ),
    ],
    ids=["none", "required", "named"],
)
async def test_tool_choice(
    client: openai.AsyncOpenAI, tool_choice: Any, question: str, expect_call: str | None
) -> None:
    seen = await collect(
        await client.chat.completions.create(
            model="concierge",
            stream=True,
            messages=user(question),
            tools=[WEATHER_TOOL],
            tool_choice=tool_choice,
        )
    )
    if expect_call is None:
        assert seen["calls"] == [] and seen["finish"] == "stop" and seen["text"]
    else:
        assert [c["name"] for c in seen["calls"]] == [expect_call]
        assert seen["finish"] == "tool_calls"


async def test_structured_output_parse_through_an_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """`response_format` travels to the upstream; the SDK's own parsing reads the answer."""
    upstream.push(upstream.reply('{"title": "The Fox"}'))
    parsed = await client.chat.completions.parse(
        model="storyteller", messages=user("a title"), response_format=Story, seed=5
    )
    assert parsed.choices[0].message.parsed == Story(title="The Fox")
    sent = upstream.records[-1].body
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "Story"
    assert sent["response_format"]["json_schema"]["schema"]["properties"]["title"]
    assert sent["seed"] == 5


async def test_abort_mid_stream_closes_the_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ", sleep=0.05) for i in range(400)]))
    stream = await client.chat.completions.create(
        model="storyteller", stream=True, messages=user("a long story")
    )
    seen = []
    async for chunk in stream:
        seen.append(chunk.choices[0].delta.content)
        if len(seen) == 3:
            break
    await stream.close()
    closed_at = time.monotonic()
    record = upstream.records[-1]
    while record.disconnected is None and time.monotonic() < closed_at + 2.0:
        await asyncio.sleep(0.01)
    assert seen == ["w0 ", "w1 ", "w2 "]
    assert record.disconnected is not None and record.chunks_sent < 60


async def test_typed_errors(client: openai.AsyncOpenAI, server: LoopbackServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="wrong", max_retries=0
    ) as stranger:
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            await stranger.chat.completions.create(model="echo", messages=user("x"))
    assert unauthorized.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="ghost", messages=user("x"))
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("ghost")
    with pytest.raises(openai.BadRequestError) as unsupported:
        await client.chat.completions.create(model="echo", messages=user("x"), logprobs=True)
    assert unsupported.value.param == "logprobs"
    for error in (unauthorized.value, unknown.value, unsupported.value):
        assert error.request_id is not None and error.request_id.startswith("req_")


async def test_upstream_outage_is_retried_by_the_sdk(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(status=503), upstream.reply("back again"))
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=API_KEY, max_retries=2
    ) as patient:
        completion = await patient.chat.completions.create(model="storyteller", messages=user("x"))
    assert completion.choices[0].message.content == "back again"
    assert len(upstream.records) == 2


async def test_models_and_request_id(client: openai.AsyncOpenAI) -> None:
    model = await client.models.retrieve("weather")
    assert (model.id, model.object) == ("weather", "model")
    listed = [m.id async for m in client.models.list()]
    assert "weather" in listed
    completion = await client.chat.completions.create(model="echo", messages=user("id?"))
    assert completion._request_id is not None and completion._request_id.startswith("req_")
