"""The flow brain: questionnaire from history, intents, client and server tools, templating."""

from __future__ import annotations

import json
from typing import Any

import openai

from tests.support import ServerFactory


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def assistant(text: str) -> Any:
    return {"role": "assistant", "content": text}


# The concierge's client tool as Tavus declares it in every request (`layers.llm.tools`).
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


async def say(
    client: openai.AsyncOpenAI, model: str, messages: list[Any], **kw: Any
) -> tuple[str, list[Any], str | None]:
    stream = await client.chat.completions.create(model=model, stream=True, messages=messages, **kw)
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish = None
    chunks = 0
    async with stream:
        async for chunk in stream:
            chunks += 1
            delta = chunk.choices[0].delta
            text.append(delta.content or "")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function:
                    call["name"] = tc.function.name or call["name"]
                    call["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), [calls[i] for i in sorted(calls)], finish


async def test_questionnaire_runs_in_order(client: openai.AsyncOpenAI) -> None:
    system = {"role": "system", "content": "preamble"}
    history: list[Any] = [system, user("Hello")]
    text, _, _ = await say(client, "interviewer", history)
    assert text == "Hi, I'm Iris. I have a few quick questions for you. What's your name?"
    answers = [
        "USER_SPEECH: Maya VISUAL_SCENE: a person at a desk",
        "Backend engineer",
        "Six years",
        "Next month",
    ]
    expected = [
        "Which role are you applying for?",
        "How many years of experience do you have?",
        "When could you start?",
        "Thank you Maya, that's everything I needed. We'll be in touch about the Backend engineer role.",
    ]
    for answer, question in zip(answers, expected, strict=True):
        history += [assistant(text), user(answer)]
        text, _, finish = await say(client, "interviewer", history)
        assert text.endswith(question), text
        assert finish == "stop"
    # after the outro, the fallback
    history += [assistant(text), user("anything else?")]
    text, _, _ = await say(client, "interviewer", history)
    assert text == "Sorry, could you say that again?"


async def test_intent_wins_and_questionnaire_resumes(client: openai.AsyncOpenAI) -> None:
    history: list[Any] = [
        user("hi"),
        assistant("Hi, I'm Iris. I have a few quick questions for you. What's your name?"),
    ]
    text, _, _ = await say(client, "interviewer", [*history, user("Sorry, can you repeat that?")])
    assert text.startswith("Of course.")
    history += [user("Sorry, can you repeat that?"), assistant(text), user("Sam")]
    text, _, _ = await say(client, "interviewer", history)
    assert text.endswith("Which role are you applying for?")


async def test_client_tool_intent_streams_tool_call(client: openai.AsyncOpenAI) -> None:
    text, calls, finish = await say(
        client, "concierge", [user("What's the weather in Paris?")], tools=[WEATHER_TOOL]
    )
    assert text == "Let me check."
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0]["name"] == "get_current_weather"
    assert json.loads(calls[0]["arguments"]) == {"location": "Paris"}
    assert calls[0]["id"].startswith("call_")
    # the result comes back in the history as a tool message
    history = [
        user("What's the weather in Paris?"),
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "type": "function",
                    "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": calls[0]["id"],
            "content": json.dumps({"summary": "68 degrees and sunny"}),
        },
    ]
    text, calls, finish = await say(client, "concierge", history, tools=[WEATHER_TOOL])
    assert text == "Here's the weather: 68 degrees and sunny"
    assert finish == "stop" and calls == []


async def test_server_tool_intent_runs_here(client: openai.AsyncOpenAI) -> None:
    text, calls, finish = await say(client, "concierge", [user("What time is it in Asia/Tokyo?")])
    assert calls == [] and finish == "stop"
    assert text.startswith("It's ") and text.endswith(" in Asia/Tokyo.")


async def test_templating_and_greeting(client: openai.AsyncOpenAI) -> None:
    text, _, _ = await say(client, "concierge", [user("thanks a lot")])
    assert text == "You're welcome, Cora the Concierge is always happy to help."
    text, _, _ = await say(client, "concierge", [user("blorp")])
    assert text.startswith("Hello, I'm Cora")
    text, _, _ = await say(client, "concierge", [user("hey"), assistant("Hello!"), user("blorp")])
    assert text.startswith("I can tell you the weather")


async def test_flow_pacing_streams_small_chunks(serve: ServerFactory, tmp_path: Any) -> None:
    personas = tmp_path / "p"
    personas.mkdir()
    (personas / "slow.yaml").write_text(
        "name: slow\npersona_name: Slow\nbrain: {kind: flow, words_per_chunk: 1, chunk_delay_ms: 20}\n"
        "flow: {fallback: 'one two three four five'}\n"
    )
    srv = serve(None, personas_dir=personas)
    import time

    async with openai.AsyncOpenAI(
        base_url=srv.url + "/v1", api_key="test-key-0123456789", max_retries=0
    ) as c:
        started = time.monotonic()
        stream = await c.chat.completions.create(model="slow", stream=True, messages=[user("x")])
        pieces = []
        async with stream:
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
        assert pieces == ["one ", "two ", "three ", "four ", "five"]
        assert time.monotonic() - started >= 0.08
