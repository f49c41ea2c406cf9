"""Helpers shared by the upstream client tests (every transport)."""

from __future__ import annotations

from typing import Any

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
