"""Chunk encoding and the SSE response for the streaming endpoint. This is the hot path: no
pydantic, no logging.

Each chunk is built from a prefix computed once per response and one `json.dumps` of the
delta, and yielded as ready-to-send bytes (`data: …\\n\\n`). `EventStreamResponse` sends
them as they come, with one ASGI message per chunk and nothing else per chunk.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cvi_agent import metrics

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    """A fresh `chatcmpl-…` id: the response's id on the wire and its turn's dedupe key."""
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkEncoder:
    """Encodes one response's chunks in the exact OpenAI `chat.completion.chunk` shape.

    The constant part of every chunk (`id`, `created`, `model`) is encoded once, here; each
    chunk then costs one `json.dumps` of its delta. The first chunk of any kind carries
    `"role": "assistant"`. One encoder per response; not shared between tasks.
    """

    __slots__ = ("_head", "_role_sent", "created", "id", "model")

    def __init__(self, model: str, id_: str | None = None, created: int | None = None) -> None:
        """`model` is echoed as the request named it; `id_` and `created` default to a fresh
        completion id and now (tests pass fixed ones)."""
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
        """A `data:` line carrying a piece of the reply's text."""
        return self._chunk("{" + self._role() + '"content":' + _dumps(text) + "}")

    def tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> bytes:
        """A client tool-call fragment; `id`, `type` and `name` only when given (first fragment)."""
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
        """The chunk with an empty delta and `finish_reason`; `end` is what streams send."""
        return self._chunk("{" + self._role().rstrip(",") + "}", _dumps(reason))

    def end(self, reason: str, usage: tuple[int, int] | None = None) -> bytes:
        """A stream's last bytes: the finish chunk, the usage chunk if asked for, `[DONE]`."""
        tail = self.finish(reason)
        if usage is not None:
            tail += self.usage(*usage)
        return tail + DONE

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The `choices: []` chunk OpenAI sends with `stream_options.include_usage` (once per
        response, so built from a plain dict)."""
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
    """Any JSON object as one SSE `data:` event, with the same compact encoder as the chunks."""
    return ("data: " + _dumps(data) + "\n\n").encode()


class ClosableBody(AsyncIterable[bytes], Protocol):
    """A body pulled chunk by chunk (an async generator)."""

    async def aclose(self) -> None:
        """Called exactly once when the response ends, however it ends (the brain's cleanup)."""
        ...


class PushBody(Protocol):
    """A body that sends itself: `run(send)` returns once its last message went out."""

    sent: int  # messages sent so far: the keep-alive ping watches it

    async def run(self, send: Send) -> None:
        """Send every body message with `send`; the last one has `more_body` False."""
        ...

    async def aclose(self) -> None:
        """Called exactly once when the response ends, also when `run` was cancelled."""
        ...


class EventStreamResponse(Response):
    """`text/event-stream` from an async iterable of ready SSE bytes.

    Who cancels whom: the request's task sends the body; a watcher task waits for the client's
    `http.disconnect` and then cancels the sending task, which closes the body at once (and so
    the brain and its upstream request, or it leaves a speculative generation: llm/turns.py).
    A comment line is sent when nothing was sent for `ping` seconds, so proxies keep the stream
    open through a long server tool. The chunk that ends with `[DONE]` also ends the HTTP body
    (one write fewer per response).
    """

    media_type = "text/event-stream"

    def __init__(self, body: ClosableBody | PushBody, ping: float = 15.0) -> None:
        """`body` is pulled (an async generator of ready chunks) or pushes itself (a turn
        subscription); either way this response owns it and closes it. `ping`: seconds of
        silence before a keep-alive comment."""
        self.stream_body = body
        self.ping = ping
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self._sent = 0
        self._disconnected = False
        self._pinger: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._pinger = None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watcher = loop.create_task(self._watch(receive, task))
        self._pinger = loop.call_later(self.ping, self._ping, loop, send, -1)
        metrics.ACTIVE_STREAMS.inc()
        try:  # the body is closed whatever happens: a subscription must always leave
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._pump(send)
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
            task.uncancel()  # the client left: that is how streams end, not an error
            if isinstance(self.stream_body, AsyncIterable):
                metrics.cancelled("client_disconnect")  # (turns count their own: "abandoned")
        finally:
            metrics.ACTIVE_STREAMS.dec()
            if self._pinger is not None:
                self._pinger.cancel()
            watcher.cancel()
            await self.stream_body.aclose()

    async def _pump(self, send: Send) -> None:
        body = self.stream_body
        if not isinstance(body, AsyncIterable):
            await body.run(send)
            return
        more = True
        async for chunk in body:
            more = not chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            self._sent += 1
            if not more:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        await _wait_disconnect(receive)
        if not task.done():
            self._disconnected = True
            task.cancel()

    def _ping(self, loop: asyncio.AbstractEventLoop, send: Send, seen: int) -> None:
        if self._disconnected:
            return
        body = self.stream_body
        sent = self._sent if isinstance(body, AsyncIterable) else body.sent
        if seen == sent:  # nothing sent for a whole interval
            message = {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}
            loop.create_task(_quiet(send(message)))
        self._pinger = loop.call_later(self.ping, self._ping, loop, send, sent)


async def _quiet(coro: Any) -> None:
    try:
        await coro
    except Exception:  # the response ended meanwhile
        pass


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
