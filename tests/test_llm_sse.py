"""Chunk encoding: exact OpenAI chunk shape, bytes ready for the wire."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from cvi_agent.llm.sse import DONE, ChunkEncoder, EventStreamResponse
from cvi_agent.protocol.chat import ChatCompletionChunk
from cvi_agent.web.errors import ApiError


def decode(raw: bytes) -> Any:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    value = json.loads(raw[6:-2])
    assert isinstance(value, dict)
    return value


def test_role_only_on_first_delta_and_unicode_kept() -> None:
    enc = ChunkEncoder("m", id_="chatcmpl-1", created=5, fingerprint="fp_0123456789")
    first, second = decode(enc.content("héllo “quoted”\n")), decode(enc.content("x"))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "system_fingerprint": "fp_0123456789",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "héllo “quoted”\n"},
                "finish_reason": None,
            }
        ],
    }
    assert second["choices"] == [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]
    ChatCompletionChunk.model_validate(first)


def test_tool_call_deltas() -> None:
    enc = ChunkEncoder("m")
    opening = decode(enc.tool_call(0, "call_1", "f", ""))
    assert opening["choices"][0]["delta"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"arguments": "", "name": "f"},
            }
        ],
    }
    more = decode(enc.tool_call(0, None, None, '{"a"'))
    assert more["choices"][0]["delta"] == {
        "content": None,
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}],
    }


def test_finish_usage_done() -> None:
    enc = ChunkEncoder("m")
    fin = decode(enc.finish("tool_calls"))
    assert fin["choices"] == [
        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": "tool_calls"}
    ]
    usage = decode(enc.usage(3, 4))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert DONE == b"data: [DONE]\n\n"


def test_fingerprint_on_every_chunk_including_usage() -> None:
    enc = ChunkEncoder("m", fingerprint="fp_abcdef0123")
    chunks = [enc.content("a"), enc.tool_call(0, "c", "f", "{}"), enc.end("stop", (3, 4))]
    events = [e for raw in chunks for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 4
    assert all(json.loads(e[6:])["system_fingerprint"] == "fp_abcdef0123" for e in events)


def test_other_choices_and_logprobs() -> None:
    """`n` > 1: each choice under its index with its own first role; logprobs passed through."""
    enc = ChunkEncoder("m")
    logprobs = {"content": [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]}
    first = decode(enc.content("a", 0, logprobs))["choices"][0]
    assert first == {
        "index": 0,
        "delta": {"role": "assistant", "content": "a"},
        "finish_reason": None,
        "logprobs": logprobs,
    }
    other = decode(enc.content("b", 1))["choices"][0]
    assert other == {
        "index": 1,
        "delta": {"role": "assistant", "content": "b"},
        "finish_reason": None,
    }
    assert decode(enc.content("c", 1))["choices"][0]["delta"] == {"content": "c"}
    assert decode(enc.content("d"))["choices"][0]["delta"] == {"content": "d"}
    call = decode(enc.tool_call(0, "call_2", "f", "{}", 2))["choices"][0]
    assert call["index"] == 2 and call["delta"]["role"] == "assistant"
    tail = [
        json.loads(e[6:])
        for e in enc.end("stop", None, {1: "length", 2: "tool_calls"}).split(b"\n\n")
        if e.startswith(b"data: {")
    ]
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in tail] == [
        (0, "stop"),
        (1, "length"),
        (2, "tool_calls"),
    ]
    for chunk in tail:
        ChatCompletionChunk.model_validate(chunk)


async def respond(body: Any, ping: float = 15.0) -> list[dict[str, Any]]:
    """Run an `EventStreamResponse` as ASGI, the client never leaving; the messages it sent."""
    sent: list[dict[str, Any]] = []
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = EventStreamResponse(body, ping=ping, start_headers=lambda: [(b"x-extra", b"1")])
    await response({"type": "http"}, receive, send)  # type: ignore[arg-type]
    return sent


async def test_a_pulled_stream_starts_with_its_first_chunk_and_can_still_fail() -> None:
    """The status is decided by the first chunk: an `ApiError` before it is the HTTP error."""

    async def fails_at_once() -> AsyncIterator[bytes]:
        raise ApiError(503, "down", "upstream_unavailable", headers={"x-cvi-fallback": "x"})
        yield b""  # pragma: no cover

    sent = await respond(fails_at_once())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert (b"x-cvi-fallback", b"x") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "upstream_unavailable"

    async def fails_later() -> AsyncIterator[bytes]:
        yield ChunkEncoder("m").content("hi")
        raise ApiError(502, "broke", "upstream_error")

    sent = await respond(fails_later())
    assert sent[0]["status"] == 200 and (b"x-extra", b"1") in sent[0]["headers"]
    assert sent[-1]["more_body"] is False and sent[-1]["body"].endswith(DONE)
    assert json.loads(sent[-1]["body"][6:].split(b"\n\n")[0])["error"]["code"] == "upstream_error"


async def test_a_keep_alive_before_the_first_chunk_starts_the_stream() -> None:
    async def slow_then_fails() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.15)
        raise ApiError(504, "late", "upstream_timeout")
        yield b""  # pragma: no cover

    sent = await respond(slow_then_fails(), ping=0.05)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[1]["body"] == b": ping\n\n"
    assert b"upstream_timeout" in sent[-1]["body"] and sent[-1]["body"].endswith(DONE)
