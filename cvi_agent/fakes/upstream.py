"""A fake OpenAI-compatible upstream: SSE chat completions with scripted or generated replies.

Raw ASGI so that it costs as little CPU as possible when it shares the machine with the
server under test (bench). It records every request, and when each client disconnected.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cvi_agent.llm.sse import DONE, ChunkEncoder

Scope = dict[str, Any]


@dataclass
class Step:
    """One scripted step of a reply."""

    content: str | None = None
    tool_name: str | None = None
    tool_arguments: str = ""
    tool_id: str | None = None
    sleep: float = 0.0


@dataclass
class Plan:
    """A whole scripted reply: HTTP error, or steps then a finish reason."""

    steps: list[Step] = field(default_factory=list)
    status: int = 200
    error_body: dict[str, Any] | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    reset_after: int | None = None  # drop the connection after N chunks
    raw_chunks: list[bytes] | None = None  # sent verbatim (malformed-chunk tests)


@dataclass
class FakeUpstreamConfig:
    ttft: float = 0.0
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    reply_words: int = 20
    tool_call_share: float = 0.0
    tool_name: str = "get_current_weather"
    seed: int = 7


@dataclass
class RequestRecord:
    body: dict[str, Any]
    headers: dict[str, str]
    started: float
    finished: float | None = None
    disconnected: float | None = None
    chunks_sent: int = 0


class FakeUpstream:
    def __init__(self, config: FakeUpstreamConfig | None = None) -> None:
        self.config = config or FakeUpstreamConfig()
        self.plans: deque[Plan] = deque()
        self.records: list[RequestRecord] = []
        self.keep_records = True
        self._random = random.Random(self.config.seed)
        self.active = 0

    def push(self, *plans: Plan) -> None:
        self.plans.extend(plans)

    def reply(self, text: str, words_per_chunk: int = 1, **kw: Any) -> Plan:
        words = text.split(" ")
        steps = [
            Step(
                content=" ".join(words[i : i + words_per_chunk])
                + (" " if i + words_per_chunk < len(words) else "")
            )
            for i in range(0, len(words), words_per_chunk)
        ]
        return Plan(steps=steps, **kw)

    def _default_plan(self, body: dict[str, Any]) -> Plan:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        cfg = self.config
        if isinstance(last, dict) and last.get("role") == "tool":
            return self.reply(f"The tool said: {last.get('content')}")
        if (
            body.get("tools")
            and cfg.tool_call_share > 0
            and self._random.random() < cfg.tool_call_share
        ):
            args = json.dumps({"location": "San Francisco, CA"})
            return Plan(
                steps=[
                    Step(content="Let me check. "),
                    Step(
                        tool_name=cfg.tool_name,
                        tool_id="call_" + str(self._random.randrange(10**9)),
                    ),
                    Step(tool_arguments=args[: len(args) // 2]),
                    Step(tool_arguments=args[len(args) // 2 :]),
                ],
                finish_reason="tool_calls",
            )
        return Plan(steps=[Step(content=f"word{i} ") for i in range(cfg.reply_words)])

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await self._json(
                send, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            )
            return
        if scope["method"] != "POST" or not path.endswith("/chat/completions"):
            await self._json(send, 404, {"error": {"message": "not found", "type": "not_found"}})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(chunks) or b"{}")
        record = RequestRecord(
            body=body,
            headers={k.decode(): v.decode() for k, v in scope["headers"]},
            started=time.monotonic(),
        )
        if self.keep_records:
            self.records.append(record)
        plan = self.plans.popleft() if self.plans else self._default_plan(body)
        if plan.status != 200:
            await self._json(
                send,
                plan.status,
                plan.error_body or {"error": {"message": "upstream error", "type": "server_error"}},
            )
            record.finished = time.monotonic()
            return
        self.active += 1
        try:
            if body.get("stream"):
                await self._stream(plan, body, record, receive, send)
            else:
                await self._complete(plan, body, send)
        finally:
            self.active -= 1
            record.finished = time.monotonic()

    async def _json(self, send: Any, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _complete(self, plan: Plan, body: dict[str, Any], send: Any) -> None:
        text = "".join(s.content or "" for s in plan.steps)
        await self._json(
            send,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    async def _stream(
        self, plan: Plan, body: dict[str, Any], record: RequestRecord, receive: Any, send: Any
    ) -> None:
        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    record.disconnected = time.monotonic()
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        writer = asyncio.ensure_future(self._write(plan, body, record, send))
        try:
            await asyncio.wait({watcher, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, writer):
                task.cancel()
            await asyncio.gather(watcher, writer, return_exceptions=True)

    async def _write(
        self, plan: Plan, body: dict[str, Any], record: RequestRecord, send: Any
    ) -> None:
        cfg = self.config
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        ttft = plan.ttft if plan.ttft is not None else cfg.ttft
        if ttft:
            await asyncio.sleep(ttft)
        gap = 1.0 / cfg.tokens_per_second if cfg.tokens_per_second else 0.0
        if plan.raw_chunks is not None:
            for raw in plan.raw_chunks:
                await send({"type": "http.response.body", "body": raw, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        enc = ChunkEncoder(str(body.get("model", "fake")))
        tool_index = -1
        for n, step in enumerate(plan.steps):
            if plan.reset_after is not None and n >= plan.reset_after:
                raise ConnectionResetError("scripted reset")
            if n and gap:
                await asyncio.sleep(gap)
            if step.sleep:
                await asyncio.sleep(step.sleep)
            if step.content is not None:
                chunk = enc.content(step.content)
            elif step.tool_name is not None:
                tool_index += 1
                chunk = enc.tool_call(
                    tool_index, step.tool_id or f"call_{tool_index}", step.tool_name, ""
                )
            else:
                chunk = enc.tool_call(max(tool_index, 0), None, None, step.tool_arguments)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            record.chunks_sent += 1
        finish = plan.finish_reason or ("tool_calls" if tool_index >= 0 else "stop")
        tail = enc.finish(finish)
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            tail += enc.usage(10, len(plan.steps))
        await send({"type": "http.response.body", "body": tail + DONE, "more_body": False})
