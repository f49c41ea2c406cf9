"""A fake OpenAI-compatible upstream: SSE chat completions with scripted or generated replies.

Raw ASGI so that it costs as little CPU as possible when it shares the machine with the
server under test (bench). It records every request, and when each client disconnected;
`GET /_fake/records?since=N` hands those records to another process (bench runs it as its own
process: `python -m cvi_agent.devtools.fakes.upstream --port P --ttft 0.3 --tps 50`). Upstreams
that never end a reply on their own are in `MISBEHAVIOURS` (`--misbehave-by-model`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvi_agent.llm.sse import DONE, ChunkEncoder

Scope = dict[str, Any]


@dataclass
class ReplyStep:
    """One scripted step of a reply: a content chunk, a tool-call chunk, or `raw` bytes.

    A misbehaving upstream is a few steps of `raw` bytes repeated: `repeat` times, `sleep`
    seconds before each (a line that never ends, comments forever, data lines with no blank
    line after them); see `MISBEHAVIOURS`. An empty `raw` sends nothing: the upstream only
    holds the stream open for `sleep` seconds (a reply that hangs mid-way).
    """

    content: str | None = None
    tool_name: str | None = None
    tool_arguments: str = ""
    tool_id: str | None = None
    sleep: float = 0.0
    raw: bytes | None = None  # sent verbatim instead of a chunk
    repeat: int = 1


@dataclass
class Plan:
    """A whole scripted reply: HTTP error, or steps then a finish reason."""

    steps: list[ReplyStep] = field(default_factory=list)
    status: int = 200
    error_body: dict[str, Any] | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    reset_after: int | None = None  # drop the connection after N chunks
    raw_chunks: list[bytes] | None = None  # sent verbatim (malformed-chunk tests)
    end_delay: float = 0.0  # seconds between the last chunk and the end of the HTTP body


@dataclass
class FakeUpstreamConfig:
    ttft: float = 0.0  # seconds from the request to the first chunk
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    reply_words: int = 20  # chunks (one word each) in a generated reply
    tool_call_share: float = 0.0  # share of requests with `tools` answered by a tool call
    tool_name: str = "get_current_weather"
    seed: int = 7
    record_bodies: bool = True  # False: keep only the last user text (long benchmarks)


@dataclass
class RequestRecord:
    body: dict[str, Any]
    headers: dict[str, str]
    started: float
    finished: float | None = None
    disconnected: float | None = None
    first_chunk: float | None = None
    chunks_sent: int = 0
    user_text: str = ""
    complete: bool = False  # the whole reply was handed to the server
    client: tuple[str, int] | None = None  # the connection it came on (reuse shows here)

    def summary(self) -> dict[str, Any]:
        """The record without body and headers: what another process needs (bench)."""
        return {
            "user_text": self.user_text,
            "started": self.started,
            "first_chunk": self.first_chunk,
            "finished": self.finished,
            "disconnected": self.disconnected,
            "chunks_sent": self.chunks_sent,
        }


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


class FakeUpstream:
    def __init__(self, config: FakeUpstreamConfig | None = None) -> None:
        self.config = config or FakeUpstreamConfig()
        self.plans: deque[Plan] = deque()
        self.records: list[RequestRecord] = []
        self.keep_records = True
        self._random = random.Random(self.config.seed)
        self.active = 0
        # A request whose `model` names one of `MISBEHAVIOURS` is answered that way.
        self.misbehave_by_model = False

    def push(self, *plans: Plan) -> None:
        self.plans.extend(plans)

    def reply(self, text: str, words_per_chunk: int = 1, **kw: Any) -> Plan:
        words = text.split(" ")
        steps = [
            ReplyStep(
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
                    ReplyStep(content="Let me check. "),
                    ReplyStep(
                        tool_name=cfg.tool_name,
                        tool_id="call_" + str(self._random.randrange(10**9)),
                    ),
                    ReplyStep(tool_arguments=args[: len(args) // 2]),
                    ReplyStep(tool_arguments=args[len(args) // 2 :]),
                ],
                finish_reason="tool_calls",
            )
        return Plan(steps=[ReplyStep(content=f"word{i} ") for i in range(cfg.reply_words)])

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
        if path.startswith("/_fake/"):
            await self._control(scope, send)
            return
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
        keep = self.config.record_bodies
        record = RequestRecord(
            body=body if keep else {},
            headers={k.decode(): v.decode() for k, v in scope["headers"]} if keep else {},
            started=time.monotonic(),
            user_text=_last_user_text(body),
            client=tuple(scope["client"]) if scope.get("client") else None,
        )
        if self.keep_records:
            self.records.append(record)
        if self.plans:
            plan = self.plans.popleft()
        elif self.misbehave_by_model and body.get("model") in MISBEHAVIOURS:
            plan = MISBEHAVIOURS[body["model"]]()
        else:
            plan = self._default_plan(body)
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

    async def _control(self, scope: Scope, send: Any) -> None:
        """`GET /_fake/records?since=N` (record summaries), `DELETE /_fake/records`."""
        if scope["path"] != "/_fake/records":
            await self._json(send, 404, {"error": {"message": "not found", "type": "not_found"}})
            return
        if scope["method"] == "DELETE":
            self.records.clear()
            await self._json(send, 200, {"records": [], "next": 0})
            return
        since = 0
        for part in scope.get("query_string", b"").decode().split("&"):
            name, _, value = part.partition("=")
            if name == "since" and value.isdigit():
                since = int(value)
        records = [r.summary() for r in self.records[since:]]
        await self._json(
            send, 200, {"records": records, "next": len(self.records), "active": self.active}
        )

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
                    # uvicorn also says "disconnect" once a response is complete: not a cancel
                    if not record.complete:
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
            record.complete = True
            if plan.end_delay:
                await asyncio.sleep(plan.end_delay)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        enc = ChunkEncoder(str(body.get("model", "fake")))
        tool_index = -1
        for n, step in enumerate(plan.steps):
            if plan.reset_after is not None and n >= plan.reset_after:
                raise ConnectionResetError("scripted reset")
            if n and gap:
                await asyncio.sleep(gap)
            if step.raw is not None:
                for _ in range(step.repeat):
                    # Always a turn of the loop: a send to a closed connection does not yield,
                    # and the disconnect must be seen.
                    await asyncio.sleep(step.sleep)
                    if step.raw:
                        await send(
                            {"type": "http.response.body", "body": step.raw, "more_body": True}
                        )
                continue
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
            if not record.chunks_sent:
                record.first_chunk = time.monotonic()
            record.chunks_sent += 1
        finish = plan.finish_reason or ("tool_calls" if tool_index >= 0 else "stop")
        tail = enc.finish(finish)
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            tail += enc.usage(10, len(plan.steps))
        record.complete = True
        await send({"type": "http.response.body", "body": tail + DONE, "more_body": False})


def _long_line() -> Plan:
    """One token, then a line that never ends (64 KiB at a time, as fast as it is read)."""
    return Plan(steps=[ReplyStep(content="Hello "), ReplyStep(raw=b"x" * 65536, repeat=100_000)])


def _comments() -> Plan:
    """One token, then an SSE comment every 10 ms, for a minute: the reply never ends."""
    return Plan(
        steps=[
            ReplyStep(content="Hello "),
            ReplyStep(raw=b": keepalive\n", repeat=6000, sleep=0.01),
        ]
    )


def _data_lines() -> Plan:
    """One token, then `data:` lines (16 KiB each, every millisecond, for a minute) with no blank
    line after them: one event that never ends."""
    return Plan(
        steps=[
            ReplyStep(content="Hello "),
            ReplyStep(raw=b"data: " + b"y" * 16384 + b"\n", repeat=60_000, sleep=0.001),
        ]
    )


def _empty_events() -> Plan:
    """One token, then well-formed chunks with nothing in them, every millisecond, for a minute."""
    chunk = b'data: {"choices":[{"index":0,"delta":{}}]}\n\n'
    return Plan(
        steps=[ReplyStep(content="Hello "), ReplyStep(raw=chunk, repeat=60_000, sleep=0.001)]
    )


def _hang() -> Plan:
    """One token, then silence for a minute with the stream open."""
    return Plan(steps=[ReplyStep(content="Hello "), ReplyStep(raw=b"", sleep=60.0)])


# Upstreams that never end a reply on their own, by name (`--misbehave-by-model` serves one to
# each request for a model of that name): what the reader's bounds and the reply budget are
# tested against.
MISBEHAVIOURS: dict[str, Callable[[], Plan]] = {
    "long-line": _long_line,
    "comments": _comments,
    "data-lines": _data_lines,
    "empty-events": _empty_events,
    "hang": _hang,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a fake upstream on its own (bench runs it as a separate process)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m cvi_agent.devtools.fakes.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first chunk")
    parser.add_argument("--tps", type=float, default=0.0, help="tokens (chunks) per second")
    parser.add_argument("--words", type=int, default=20, help="chunks in a generated reply")
    parser.add_argument("--tool-call-share", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--misbehave-by-model",
        action="store_true",
        help=f"answer a request for model {', '.join(sorted(MISBEHAVIOURS))} that way",
    )
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        FakeUpstreamConfig(
            ttft=args.ttft,
            tokens_per_second=args.tps,
            reply_words=args.words,
            tool_call_share=args.tool_call_share,
            seed=args.seed,
            record_bodies=False,
        )
    )
    fake.misbehave_by_model = args.misbehave_by_model
    uvicorn.run(
        fake,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
