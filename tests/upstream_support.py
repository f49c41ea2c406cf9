"""Helpers shared by the upstream client tests (every transport)."""

from __future__ import annotations

from typing import Any

from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.llm.upstream.client import ChatStreamClient

PARAMS: dict[str, Any] = {
    "model": "fake",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "héllo ✓"}],
}


async def collect(client: ChatStreamClient, params: dict[str, Any] = PARAMS) -> list[Any]:
    async with await client.stream(params) as stream:
        return [event async for event in stream]


async def assert_story_relayed(client: ChatStreamClient, upstream: FakeUpstream) -> None:
    """`client` streams the fake upstream's "Once upon a time" (pushed here) intact, usage last,
    and sent exactly `PARAMS` with the key and SSE accept header; the client is closed after."""
    upstream.push(upstream.reply("Once upon a time"))
    try:
        events = await collect(client)
    finally:
        await client.aclose()
    contents = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert "".join(c or "" for c in contents) == "Once upon a time"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["total_tokens"] > 0
    record = upstream.records[-1]
    assert record.body == PARAMS  # exactly what we sent, unicode intact
    assert record.headers["authorization"] == "Bearer sk-test"
    assert record.headers["accept"] == "text/event-stream"
