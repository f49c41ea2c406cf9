"""Request parameters: an upstream persona forwards what it does not interpret (with the
persona's `brain.extra_body` under the request's values); a brain that cannot honour one (`n`,
`logprobs`, `response_format` on a flow or echo persona) answers 400 naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan
from cvi_agent.personas import PersonaError, load_persona
from tests.support import API_KEY, ServerFactory

AUTH = {"Authorization": f"Bearer {API_KEY}"}
USER: Any = [{"role": "user", "content": "hi"}]

FORWARDED: dict[str, Any] = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    "stop": ["\n\n", "END"],
    "seed": 42,
    "top_p": 0.5,
    "presence_penalty": 0.25,
    "frequency_penalty": -0.5,
    "logprobs": True,
    "top_logprobs": 2,
    "user": "user-123",
    "metadata": {"team": "voice"},
    "service_tier": "auto",
    "reasoning_effort": "low",
    "x_vendor_option": {"anything": [1, 2, 3]},  # a parameter nobody has heard of yet
}


def sse_chunks(raw: str) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]


def raw_plan(*chunks: dict[str, Any]) -> Plan:
    """An upstream answer sent chunk by chunk exactly as given (several choices, logprobs)."""
    body = [("data: " + json.dumps(c) + "\n\n").encode() for c in chunks]
    return Plan(raw_chunks=[*body, b"data: [DONE]\n\n"])


def chunk(choice: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": choice, "delta": delta, "finish_reason": None, **extra}],
    }


async def test_upstream_gets_every_parameter_it_does_not_interpret(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    """Fails before: only model, messages, stream, stream_options, temperature, max_tokens,
    tools and tool_choice reached the upstream."""
    body = {"model": "storyteller", "messages": USER, **FORWARDED}
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    sent = upstream.records[-1].body
    for key, value in FORWARDED.items():
        assert sent[key] == value, key
    assert sent["model"] == "gpt-4o-mini" and sent["messages"] == USER
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0.8 and sent["max_tokens"] == 300  # the persona's defaults


async def test_sdk_parameters_reach_the_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await client.chat.completions.create(
        model="storyteller",
        messages=USER,
        stop="END",
        seed=7,
        presence_penalty=1.0,
        response_format={"type": "json_object"},
        extra_body={"x_vendor_option": True},
        max_completion_tokens=50,
    )
    sent = upstream.records[-1].body
    assert (sent["stop"], sent["seed"], sent["presence_penalty"]) == ("END", 7, 1.0)
    assert sent["response_format"] == {"type": "json_object"} and sent["x_vendor_option"] is True
    # the request's own limit under its own name (reasoning models refuse `max_tokens`)
    assert sent["max_completion_tokens"] == 50 and "max_tokens" not in sent


def persona_file(tmp_path: Path, upstream_url: str, extra_body: str) -> Path:
    personas = tmp_path / "personas"
    personas.mkdir(exist_ok=True)
    (personas / "tuned.yaml").write_text(
        f"""
name: tuned
persona_name: Tuned
brain:
  kind: upstream
  model: m
  base_url: {upstream_url}/v1
  temperature: 0.3
  max_tokens: 100
  extra_body: {extra_body}
"""
    )
    return personas


async def test_extra_body_is_merged_under_the_request(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Fails before: `brain.extra_body` is not a persona field (the persona is refused)."""
    extra = "{seed: 1, top_k: 40, temperature: 0.9, response_format: {type: json_object}}"
    srv = serve(upstream, personas_dir=persona_file(tmp_path, upstream.url, extra))  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=srv.url) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": "tuned", "messages": USER, "seed": 2},
            headers=AUTH,
        )
    assert resp.status_code == 200, resp.text
    sent = upstream.records[-1].body
    assert sent["seed"] == 2  # the request's value wins
    assert sent["top_k"] == 40 and sent["response_format"] == {"type": "json_object"}
    assert sent["temperature"] == 0.9  # extra_body over the persona's own temperature
    assert sent["max_tokens"] == 100


@pytest.mark.parametrize(
    ("brain", "problem"),
    [
        ("{kind: upstream, model: m, extra_body: {model: other}}", "cannot set model"),
        ("{kind: upstream, model: m, extra_body: {stream: false}}", "cannot set stream"),
        ("{kind: flow, extra_body: {seed: 1}}", "upstream brains only"),
    ],
)
def test_extra_body_misuse_is_refused_at_load(tmp_path: Path, brain: str, problem: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\npersona_name: P\nbrain: {brain}\nflow: {{}}\n")
    with pytest.raises(PersonaError, match=problem):
        load_persona(path)


async def test_n_choices_are_relayed(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    """Fails before: `n: 2` returned one choice (both interleaved into it)."""
    plan = raw_plan(
        chunk(0, {"role": "assistant", "content": "Hello"}),
        chunk(1, {"role": "assistant", "content": "Hi"}),
        chunk(0, {"content": " there"}),
        chunk(1, {"content": " you"}),
        {**chunk(0, {}), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk(1, {}), "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
    )
    upstream.push(plan)
    completion = await client.chat.completions.create(model="storyteller", messages=USER, n=2)
    assert upstream.records[-1].body["n"] == 2
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "Hello there", "stop"),
        (1, "Hi you", "length"),
    ]
    upstream.push(plan)
    stream = await client.chat.completions.create(
        model="storyteller", messages=USER, n=2, stream=True
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    async with stream:
        async for part in stream:
            for choice in part.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello there", 1: "Hi you"}
    assert finishes == {0: "stop", 1: "length"}


async def test_logprobs_are_relayed(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    """Fails before: `logprobs: true` returned null."""

    def lp(token: str) -> dict[str, Any]:
        return {
            "content": [
                {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}
            ],
            "refusal": None,
        }

    plan = raw_plan(
        chunk(0, {"role": "assistant", "content": "Yes"}, logprobs=lp("Yes")),
        chunk(0, {"content": "!"}, logprobs=lp("!")),
    )
    upstream.push(plan)
    completion = await client.chat.completions.create(
        model="storyteller", messages=USER, logprobs=True
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["Yes", "!"]
    upstream.push(plan)
    stream = await client.chat.completions.create(
        model="storyteller", messages=USER, logprobs=True, stream=True
    )
    tokens = []
    async with stream:
        async for part in stream:
            if part.choices and part.choices[0].logprobs and part.choices[0].logprobs.content:
                tokens += [t.token for t in part.choices[0].logprobs.content]
    assert tokens == ["Yes", "!"]


@pytest.mark.parametrize("model", ["concierge", "echo"])
@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ],
)
async def test_what_a_brain_without_a_model_cannot_honour_is_a_400(
    server: LoopbackServer, model: str, param: str, value: Any
) -> None:
    """Fails before: a 200 that ignored the parameter."""
    body = {"model": model, "messages": USER, param: value}
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_parameter"


async def test_what_a_brain_without_a_model_honours_trivially(server: LoopbackServer) -> None:
    body = {
        "model": "echo",
        "messages": USER,
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
        "seed": 3,
        "stop": "x",
    }
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "hi"
