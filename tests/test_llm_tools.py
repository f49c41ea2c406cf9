"""A turn's tools as OpenAI defines them, for every brain (llm/tools.py): the request's tools
(always returned to the caller, winning over a persona tool of the same name) plus the persona's
server tools the request does not shadow; `tool_choice` none / required / a named function;
`parallel_tool_calls`. Driven through the real openai SDK against real uvicorn."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def tool(tool_name: str, **properties: Any) -> Any:
    """A function tool as a caller declares it."""
    return {
        "type": "function",
        "function": {
            "name": tool_name,
            "description": f"the caller's own {tool_name}",
            "parameters": {"type": "object", "properties": properties},
        },
    }


WEATHER = tool("get_current_weather", city={"type": "string"})  # the persona says `location`


async def ask(
    client: openai.AsyncOpenAI, model: str, text: str | list[Any], **kw: Any
) -> tuple[str, list[dict[str, str]], str | None]:
    """(text, tool calls, finish reason) of one streamed answer."""
    messages: Any = [{"role": "user", "content": text}] if isinstance(text, str) else text
    stream = await client.chat.completions.create(model=model, stream=True, messages=messages, **kw)
    parts: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async with stream:
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            parts.append(delta.content or "")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] = tc.function.name or call["name"]
                    call["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), [calls[i] for i in sorted(calls)], finish


def sent_tools(upstream: FakeUpstream) -> dict[str, Any]:
    """The tools the upstream received in its last request, by name."""
    return {t["function"]["name"]: t for t in upstream.records[-1].body.get("tools") or []}


def tool_call_plan(*calls: tuple[str, str], text: str = "") -> Plan:
    steps = [ReplyStep(content=text)] if text else []
    for i, (name, arguments) in enumerate(calls):
        steps += [
            ReplyStep(tool_name=name, tool_id=f"call_{i}"),
            ReplyStep(tool_arguments=arguments),
        ]
    return Plan(steps=steps, finish_reason="tool_calls")


# -- the upstream brain -------------------------------------------------------------------


async def test_request_tool_wins_over_persona_tool_schema_and_all(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Fails before: the upstream got the persona's `get_current_weather` (with `location`)."""
    upstream.push(tool_call_plan(("get_current_weather", '{"city": "Oslo"}')))
    _, calls, finish = await ask(client, "weather", "weather in Oslo?", tools=[WEATHER])
    assert sent_tools(upstream)["get_current_weather"] == WEATHER
    assert set(sent_tools(upstream)) == {"get_current_weather", "get_current_time"}
    assert calls == [
        {"id": "call_0", "name": "get_current_weather", "arguments": '{"city": "Oslo"}'}
    ]
    assert finish == "tool_calls"


async def test_request_tool_shadowing_a_server_tool_is_returned_not_run(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Fails before: the persona's server tool of that name ran here and was never returned."""
    mine = tool("get_current_time", place={"type": "string"})
    upstream.push(tool_call_plan(("get_current_time", '{"place": "Lima"}')))
    text, calls, finish = await ask(client, "weather", "time in Lima?", tools=[mine])
    assert calls == [{"id": "call_0", "name": "get_current_time", "arguments": '{"place": "Lima"}'}]
    assert finish == "tool_calls" and text == ""
    assert len(upstream.records) == 1, "no server round: the caller runs its own tool"
    assert sent_tools(upstream) == {"get_current_time": mine}


async def test_undeclared_client_tool_is_neither_offered_nor_emitted(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Fails before: the persona's client tool was offered and its call streamed back."""
    upstream.push(
        tool_call_plan(("get_current_weather", '{"location": "Rome"}'), text="Let me check. ")
    )
    text, calls, finish = await ask(client, "weather", "weather in Rome?")
    assert set(sent_tools(upstream)) == {"get_current_time"}  # the server tool only
    assert calls == [] and text == "Let me check. " and finish == "stop"


async def test_tool_choice_none_is_forwarded_and_a_call_made_anyway_dropped(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(tool_call_plan(("get_current_weather", "{}"), text="Sunny, I think. "))
    text, calls, finish = await ask(
        client, "weather", "weather?", tools=[WEATHER], tool_choice="none"
    )
    assert upstream.records[-1].body["tool_choice"] == "none"
    assert calls == [] and text == "Sunny, I think. " and finish == "stop"


async def test_tool_choice_named_and_required_are_forwarded(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    named = {"type": "function", "function": {"name": "get_current_weather"}}
    upstream.push(tool_call_plan(("get_current_weather", "{}")))
    await ask(client, "weather", "x", tools=[WEATHER], tool_choice=named)
    assert upstream.records[-1].body["tool_choice"] == named
    upstream.push(tool_call_plan(("get_current_weather", "{}")))
    await ask(client, "weather", "x", tools=[WEATHER], tool_choice="required")
    assert upstream.records[-1].body["tool_choice"] == "required"


async def test_required_satisfied_by_a_server_tool_lets_the_model_speak_next(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """A forced call made to a server tool is run here; the next round may answer in text."""
    upstream.push(tool_call_plan(("get_current_time", '{"timezone": "UTC"}')))
    text, calls, finish = await ask(client, "weather", "time?", tool_choice="required")
    assert [r.body["tool_choice"] for r in upstream.records] == ["required", "auto"]
    assert calls == [] and text.startswith("The tool said: ") and finish == "stop"


async def test_parallel_tool_calls_false_is_forwarded_and_respected(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Fails before: the parameter was dropped and both calls went to the caller."""
    upstream.push(
        tool_call_plan(("get_current_weather", '{"city": "A"}'), ("get_current_weather", "{}"))
    )
    _, calls, finish = await ask(
        client, "weather", "two cities", tools=[WEATHER], parallel_tool_calls=False
    )
    assert upstream.records[-1].body["parallel_tool_calls"] is False
    assert [c["arguments"] for c in calls] == ['{"city": "A"}'] and finish == "tool_calls"


async def test_parallel_tool_calls_not_sent_without_tools(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """OpenAI refuses `parallel_tool_calls` in a request without tools."""
    await ask(client, "storyteller", "a story", parallel_tool_calls=True)
    body = upstream.records[-1].body
    assert "tools" not in body and "parallel_tool_calls" not in body


# -- the flow brain (the concierge persona) -------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},  # no tools declared
        {"tools": [tool("book_table")]},  # other tools only
        {"tools": [WEATHER], "tool_choice": "none"},
    ],
    ids=["no-tools", "other-tools", "tool-choice-none"],
)
async def test_flow_intent_bound_to_an_uncallable_client_tool_speaks_instead(
    client: openai.AsyncOpenAI, kw: dict[str, Any]
) -> None:
    """Fails before: the concierge emitted `get_current_weather` whatever the request said."""
    text, calls, finish = await ask(client, "concierge", "What's the weather in Paris?", **kw)
    assert calls == [] and finish == "stop"
    assert text == "I can't check the weather from here, sorry. I can tell you the time anywhere."


async def test_flow_intent_without_a_without_tool_line_speaks_the_flow_fallback(
    serve: Any, upstream: FakeUpstream, tmp_path: Any
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "desk.yaml").write_text(
        "name: desk\npersona_name: Desk\nbrain: {kind: flow}\n"
        "flow:\n  fallback: 'I can only chat.'\n"
        "  intents: [{name: book, patterns: [book], reply: 'Booking.', tool: {name: book}}]\n"
        "tools: [{type: function, execution: client, function: {name: book}}]\n"
    )
    srv = serve(upstream, personas_dir=personas)
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        assert await ask(c, "desk", "book it") == ("I can only chat.", [], "stop")
        text, calls, _ = await ask(c, "desk", "book it", tools=[tool("book")])
    assert text == "Booking." and calls[0]["name"] == "book"


async def test_flow_required_makes_a_call_whatever_was_said(client: openai.AsyncOpenAI) -> None:
    """Fails before: `required` was answered in text."""
    _text, calls, finish = await ask(
        client, "concierge", "hello there", tools=[WEATHER], tool_choice="required"
    )
    assert finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_current_weather"]
    assert json.loads(calls[0]["arguments"]) == {"location": ""}  # no place was said


async def test_flow_named_function_is_that_call(client: openai.AsyncOpenAI) -> None:
    """Fails before: a time question answered with the time, not the forced weather call."""
    forced = {"type": "function", "function": {"name": "get_current_weather"}}
    _text, calls, finish = await ask(
        client, "concierge", "What time is it in Asia/Tokyo?", tools=[WEATHER], tool_choice=forced
    )
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["get_current_weather"]
    assert json.loads(calls[0]["arguments"]) == {"location": ""}  # no place in what was said
    # with a place said, the weather intent's own arguments
    _text, calls, _ = await ask(
        client,
        "concierge",
        "What time is it? And the weather in Paris?",
        tools=[WEATHER],
        tool_choice=forced,
    )
    assert json.loads(calls[0]["arguments"]) == {"location": "Paris"}


async def test_flow_forced_call_to_a_tool_no_intent_knows(client: openai.AsyncOpenAI) -> None:
    """LangChain's `with_structured_output(method="function_calling")`: a named schema tool.
    Before: `OutputParserException: Unknown tool type: 'get_current_weather'`."""
    person = tool("Person", name={"type": "string"})
    forced = {"type": "function", "function": {"name": "Person"}}
    text, calls, finish = await ask(
        client, "concierge", "What's the weather in Paris?", tools=[person], tool_choice=forced
    )
    assert [(c["name"], c["arguments"]) for c in calls] == [("Person", "{}")]
    assert finish == "tool_calls" and text == ""


async def test_flow_named_server_tool_runs_here(client: openai.AsyncOpenAI) -> None:
    forced = {"type": "function", "function": {"name": "get_current_time"}}
    text, calls, finish = await ask(
        client, "concierge", "What time is it in Asia/Tokyo?", tool_choice=forced
    )
    assert calls == [] and finish == "stop"
    assert text.startswith("It's ") and text.endswith(" in Asia/Tokyo.")


async def test_flow_request_tool_named_like_a_server_tool_goes_to_the_caller(
    client: openai.AsyncOpenAI,
) -> None:
    """Fails before: the persona's `get_current_time` ran here."""
    text, calls, finish = await ask(
        client,
        "concierge",
        "What time is it in Asia/Tokyo?",
        tools=[tool("get_current_time", timezone={"type": "string"})],
    )
    assert finish == "tool_calls" and text == ""
    assert calls[0]["name"] == "get_current_time"
    assert json.loads(calls[0]["arguments"]) == {"timezone": "Asia/Tokyo"}


# -- the echo brain, and what no brain can honour -------------------------------------------


async def test_echo_honours_a_forced_call(client: openai.AsyncOpenAI) -> None:
    text, calls, finish = await ask(
        client, "echo", "repeat me", tools=[tool("ping")], tool_choice="required"
    )
    assert [(c["name"], c["arguments"]) for c in calls] == [("ping", "{}")]
    assert finish == "tool_calls" and text == ""
    assert await ask(client, "echo", "repeat me", tools=[tool("ping")]) == (
        "repeat me",
        [],
        "stop",
    )


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("echo", {"tool_choice": "required"}),
        ("concierge", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ("weather", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        # the persona's client tool is not callable unless the request declares it
        (
            "weather",
            {"tool_choice": {"type": "function", "function": {"name": "get_current_weather"}}},
        ),
        ("echo", {"tool_choice": "sometimes"}),
        ("echo", {"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}),
    ],
)
async def test_unusable_tool_choice_is_a_400(
    server: LoopbackServer, model: str, body: dict[str, Any]
) -> None:
    payload = {"model": model, "messages": [{"role": "user", "content": "x"}], **body}
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=payload, headers=AUTH)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "tool_choice" and error["type"] == "invalid_request_error"
