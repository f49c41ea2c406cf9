"""Upstream faults, with the real openai SDK as the caller: whatever the upstream does, the
caller gets a valid SSE stream ending with [DONE] within the persona's first-token budget; the
fallback chain (a second upstream, then a spoken line) and the circuit breaker. These personas
speak their fallback line (`on_upstream_failure: speak`); tests/test_llm_failure.py covers the
`error` answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY, ServerFactory

FALLBACK_LINE = "Sorry, give me one second."


@pytest.fixture
def backup() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with LoopbackServer(fake) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


def personas_dir(
    tmp_path: Path, primary: str, backup: str, budget: float = 1.0, reply: float = 30
) -> Path:
    d = tmp_path / "personas"
    d.mkdir(exist_ok=True)
    (d / "chain.yaml").write_text(
        f"""
name: chain
persona_name: Chain
brain:
  kind: upstream
  model: primary-model
  base_url: {primary}/v1
  first_token_timeout: {budget}
  reply_timeout: {reply}
  fallbacks:
    - {{model: backup-model, base_url: "{backup}/v1"}}
fallback_text: "{FALLBACK_LINE}"
on_upstream_failure: speak
"""
    )
    (d / "single.yaml").write_text(
        f"""
name: single
persona_name: Single
brain: {{kind: upstream, model: m, base_url: "{primary}/v1", first_token_timeout: {budget}, reply_timeout: {reply}}}
fallback_text: "{FALLBACK_LINE}"
on_upstream_failure: speak
"""
    )
    return d


async def ask(server: LoopbackServer, model: str) -> tuple[str, str | None, float]:
    """(text, finish_reason, seconds) of one streamed request; the SDK validates the stream."""
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        stream = await c.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": "hello"}]
        )
        text, finish = [], None
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish, time.monotonic() - started


FAULTS = {
    "http_500": Plan(status=500),
    "http_429": Plan(
        status=429, error_body={"error": {"message": "slow down", "type": "rate_limit"}}
    ),
    "no_first_token": Plan(ttft=5.0, steps=[ReplyStep(content="too late")]),
    "malformed_chunk": Plan(raw_chunks=[b"data: {not json at all\n\n", b"data: [DONE]\n\n"]),
    "error_event": Plan(raw_chunks=[b'data: {"error": {"message": "overloaded"}}\n\n']),
    "empty_reply": Plan(steps=[], finish_reason="stop"),
}


def delta_chunk(delta: dict[str, Any], finish_reason: Any = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def tool_delta(**fields: Any) -> dict[str, Any]:
    """A tool-call delta, well-formed but for `fields` (`index`, `id`, `name`, `arguments`)."""
    call = {"index": 0, "id": "call_1", "type": "function"}
    call.update({k: v for k, v in fields.items() if k in ("index", "id")})
    function = {"name": "lookup", "arguments": ""}
    function.update({k: v for k, v in fields.items() if k in ("name", "arguments")})
    call["function"] = function
    return {"content": None, "tool_calls": [call]}


# Chunks whose fields would reach the caller with the wrong type: each is a malformed chunk.
MALFORMED = {
    "content_a_list": delta_chunk({"content": ["a", "b"]}),
    "content_a_number": delta_chunk({"content": 42}),
    "content_an_object": delta_chunk({"content": {"text": "hi"}}),
    "tool_call_name_a_number": delta_chunk(tool_delta(name=7)),
    "tool_call_arguments_an_object": delta_chunk(tool_delta(arguments={"q": 1})),
    "tool_call_id_a_number": delta_chunk(tool_delta(id=5)),
    "tool_call_index_a_string": delta_chunk(tool_delta(index="0")),
    "tool_calls_an_object": delta_chunk({"tool_calls": {"index": 0}}),
    "choices_an_object": b'data: {"choices": {"0": {"delta": {"content": "hi"}}}}\n\n',
}
# Through the SDK, which declares no tool: a tool call would be dropped as undeclared anyway, so
# only the other kinds go through the fallback chain here (raw_turn declares `lookup`).
FAULTS.update(
    {
        f"malformed_{name}": Plan(raw_chunks=[raw, b"data: [DONE]\n\n"])
        for name, raw in MALFORMED.items()
        if not name.startswith("tool")
    }
)
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_falls_back_to_second_upstream(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path, fault: str
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, backup.url))  # type: ignore[attr-defined]
    upstream.push(FAULTS[fault])
    backup.push(backup.reply("the backup answered"))
    text, finish, seconds = await ask(server, "chain")
    assert text == "the backup answered" and finish == "stop"
    assert seconds < 1.5, "within the first-token budget (1 s) plus the reply"
    assert backup.records[-1].body["model"] == "backup-model"


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_without_backup_speaks_fallback_line(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path, fault: str
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, "http://127.0.0.1:9"))  # type: ignore[attr-defined]
    upstream.push(FAULTS[fault])
    text, finish, seconds = await ask(server, "single")
    assert text == FALLBACK_LINE and finish == "stop"
    assert seconds < 1.5


async def test_connection_refused_then_dead_backup(serve: ServerFactory, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = serve(None, personas_dir=personas_dir(tmp_path, dead, dead))
    text, finish, seconds = await ask(server, "chain")
    assert text == FALLBACK_LINE and finish == "stop" and seconds < 1.5


async def test_reset_mid_reply_ends_cleanly(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, backup.url))  # type: ignore[attr-defined]
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ") for i in range(10)], reset_after=3))
    text, finish, _ = await ask(server, "chain")
    assert text == "w0 w1 w2 " and finish == "stop"
    assert backup.records == [], "a reply already under way is not restarted elsewhere"


async def test_trickle_is_cut_at_the_reply_budget(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    dir_ = personas_dir(tmp_path, upstream.url, backup.url, reply=2.5)  # type: ignore[attr-defined]
    server = serve(None, personas_dir=dir_)
    upstream.push(
        Plan(steps=[ReplyStep(content=f"t{i} ", sleep=1.0 if i else 0.0) for i in range(30)])
    )
    text, finish, seconds = await ask(server, "chain")
    assert text.startswith("t0 t1 ") and finish == "length"
    assert 2.4 < seconds < 2.9, "ended at the budget, not at the next token after it"
    deadline = time.monotonic() + 2.0
    while upstream.records[-1].disconnected is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.records[-1].disconnected is not None, "the trickling upstream was closed"


async def test_circuit_breaker_stops_hammering_a_dead_upstream(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    server = serve(
        None,
        personas_dir=personas_dir(tmp_path, upstream.url, backup.url),  # type: ignore[attr-defined]
        breaker_failures=3,
        breaker_reset=1.0,
    )
    for _ in range(8):
        upstream.push(Plan(status=503))
    for _ in range(8):
        text, _, _ = await ask(server, "chain")
        assert text.startswith("word0"), "the backup answers every time"
    assert len(upstream.records) == 3, "after 3 failures the primary is skipped"
    assert len(backup.records) == 8
    time.sleep(1.1)  # half-open: one trial goes to the primary again
    upstream.plans.clear()
    upstream.push(upstream.reply("primary is back"))
    text, _, _ = await ask(server, "chain")
    assert text == "primary is back"
    text, _, _ = await ask(server, "chain")
    assert len(upstream.records) == 5, "closed again: the primary takes the traffic"


async def raw_turn(
    server: LoopbackServer, model: str, stream: bool, n: int = 1
) -> tuple[str, str | None]:
    """(text, finish_reason) of one request's first choice, read as bytes: a non-streamed
    answer must be a 200 and every streamed chunk well-formed (strings where the wire has
    strings, integer indexes). The request declares a `lookup` tool, so a call to it is one
    the turn may make (passed on to the caller when well-formed)."""
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
        "tools": [LOOKUP],
    }
    if n > 1:
        body["n"] = n
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        if not stream:
            resp = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            choices = resp.json()["choices"]
            assert [c["index"] for c in choices] == list(range(n)), resp.text
            for choice in choices:
                assert isinstance(choice["message"]["content"], str), resp.text
                assert "tool_calls" not in choice["message"], resp.text
            return choices[0]["message"]["content"], choices[0]["finish_reason"]
        text, finish, done = "", None, False
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        delta = choice["delta"]
                        assert type(choice["index"]) is int, line
                        assert isinstance(delta.get("content") or "", str), line
                        assert "tool_calls" not in delta, line
                        assert isinstance(choice.get("finish_reason") or "", str), line
                        if choice["index"] == 0:
                            text += delta.get("content") or ""
                            finish = choice.get("finish_reason") or finish
        assert done
        return text, finish


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_chunk_before_any_token_speaks_the_fallback(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path, name: str, stream: bool
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, "http://127.0.0.1:9"))  # type: ignore[attr-defined]
    upstream.push(Plan(raw_chunks=[MALFORMED[name], b"data: [DONE]\n\n"]))
    assert await raw_turn(server, "single", stream) == (FALLBACK_LINE, "stop")


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "name", [*sorted(MALFORMED), "finish_reason_a_number", "finish_reason_an_object"]
)
async def test_malformed_chunk_mid_reply_ends_it_cleanly(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path, name: str, stream: bool
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, "http://127.0.0.1:9"))  # type: ignore[attr-defined]
    bad = {
        "finish_reason_a_number": delta_chunk({}, finish_reason=7),
        "finish_reason_an_object": delta_chunk({}, finish_reason={"why": "done"}),
    }.get(name) or MALFORMED[name]
    good = delta_chunk({"role": "assistant", "content": "Hello "})
    upstream.push(
        Plan(raw_chunks=[good, bad, delta_chunk({"content": "never"}), b"data: [DONE]\n\n"])
    )
    assert await raw_turn(server, "single", stream) == ("Hello ", "stop")


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("name", ["choice_index_a_string", "content_a_number"])
async def test_malformed_chunk_with_several_choices(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path, name: str, stream: bool
) -> None:
    """`n` > 1 reads chunks on its own path: the same checks apply there."""
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, "http://127.0.0.1:9"))  # type: ignore[attr-defined]
    good = b'data: {"choices": [{"index": 0, "delta": {"content": "Hello "}}, ' + (
        b'{"index": 1, "delta": {"content": "Hi "}}]}\n\n'
    )
    bad = {
        "choice_index_a_string": b'data: {"choices": [{"index": "1", "delta": {"content": "x"}}]}\n\n',
        "content_a_number": b'data: {"choices": [{"index": 1, "delta": {"content": 5}}]}\n\n',
    }[name]
    upstream.push(Plan(raw_chunks=[good, bad, b"data: [DONE]\n\n"]))
    assert await raw_turn(server, "single", stream, n=2) == ("Hello ", "stop")
