"""Chunk encoding: exact OpenAI chunk shape, bytes ready for the wire."""

from __future__ import annotations

import json
from typing import Any

from cvi_agent.llm.sse import DONE, ChunkEncoder
from cvi_agent.protocol.chat import ChatCompletionChunk


def decode(raw: bytes) -> Any:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    value = json.loads(raw[6:-2])
    assert isinstance(value, dict)
    return value


def test_role_only_on_first_delta_and_unicode_kept() -> None:
    enc = ChunkEncoder("m", id_="chatcmpl-1", created=5)
    first, second = decode(enc.content("héllo “quoted”\n")), decode(enc.content("x"))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
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
