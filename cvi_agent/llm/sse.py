"""Chunk encoding for the streaming endpoint. This is the hot path: no pydantic, no logging.

Each chunk is built from a prefix computed once per response and one `json.dumps` of the
delta, and yielded as ready-to-send bytes (`data: …\\n\\n`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkEncoder:
    """Encodes one response's chunks in the exact OpenAI `chat.completion.chunk` shape."""

    __slots__ = ("_head", "_role_sent", "created", "id", "model")

    def __init__(self, model: str, id_: str | None = None, created: int | None = None) -> None:
        self.id = id_ or completion_id()
        self.created = int(time.time()) if created is None else created
        self.model = model
        self._head = (
            'data: {"id":'
            + _dumps(self.id)
            + ',"object":"chat.completion.chunk","created":'
            + str(self.created)
            + ',"model":'
            + _dumps(model)
            + ',"choices":[{"index":0,"delta":'
        )
        self._role_sent = False

    def _chunk(self, delta: str, finish: str = "null") -> bytes:
        return (self._head + delta + ',"finish_reason":' + finish + "}]}\n\n").encode()

    def _role(self) -> str:
        if self._role_sent:
            return ""
        self._role_sent = True
        return '"role":"assistant",'

    def content(self, text: str) -> bytes:
        return self._chunk("{" + self._role() + '"content":' + _dumps(text) + "}")

    def tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> bytes:
        call: dict[str, Any] = {"index": index}
        function: dict[str, Any] = {"arguments": arguments}
        if call_id is not None:
            call["id"] = call_id
            call["type"] = "function"
        if name is not None:
            function["name"] = name
        call["function"] = function
        return self._chunk(
            "{" + self._role() + '"content":null,"tool_calls":[' + _dumps(call) + "]}"
        )

    def finish(self, reason: str) -> bytes:
        return self._chunk("{" + self._role().rstrip(",") + "}", _dumps(reason))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return ("data: " + _dumps(body) + "\n\n").encode()


def encode_event(data: dict[str, Any]) -> bytes:
    return ("data: " + _dumps(data) + "\n\n").encode()
