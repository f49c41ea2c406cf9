"""Chunk encoding and the SSE response for the streaming endpoint. This is the hot path: no
pydantic, no logging.

Each chunk is built from a prefix computed once per response and one `json.dumps` of the
delta, and yielded as ready-to-send bytes (`data: …\\n\\n`). `EventStreamResponse` sends
them as they come, with one ASGI message per chunk and nothing else per chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cvi_agent import __version__, metrics
from cvi_agent.web.errors import ApiError

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

DONE = b"data: [DONE]\n\n"


def fingerprint(*parts: str) -> str:
    """An OpenAI-style `system_fingerprint` (`fp_` and 10 hex digits) of what shapes answers:
    the server's version and, per persona, its configuration."""
    digest = hashlib.sha256("\0".join(("cvi-agent", __version__, *parts)).encode()).hexdigest()
    return "fp_" + digest[:10]


#: The fingerprint of chunks encoded without a persona's own (fakes, tests).
SYSTEM_FINGERPRINT = fingerprint()


def completion_id() -> str:
    """A fresh `chatcmpl-…` id: the response's id on the wire and its turn's dedupe key."""
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkEncoder:
    """Encodes one response's chunks in the exact OpenAI `chat.completion.chunk` shape.

    The constant part of every chunk (`id`, `created`, `model`, `system_fingerprint`) is
    encoded once, here; each chunk then costs one `json.dumps` of its delta. The first chunk
    of any kind carries `"role": "assistant"` (per choice, when `n` > 1). One encoder per
    response; not shared between tasks.
    """

    __slots__ = (
        "_head",
        "_prefix",
        "_role_sent",
        "_roles",
        "created",
        "fingerprint",
        "id",
        "model",
    )

    def __init__(
        self,
        model: str,
        id_: str | None = None,
        created: int | None = None,
        fingerprint: str = SYSTEM_FINGERPRINT,
    ) -> None:
        """`model` is echoed as the request named it; `id_` and `created` default to a fresh
        completion id and now (tests pass fixed ones); `fingerprint` is the persona's
        `system_fingerprint` (`ChatService.fingerprints`)."""
        self.id = id_ or completion_id()
        self.created = int(time.time()) if created is None else created
        self.model = model
        self.fingerprint = fingerprint
        self._prefix = (
            'data: {"id":'
            + _dumps(self.id)
            + ',"object":"chat.completion.chunk","created":'
            + str(self.created)
            + ',"model":'
            + _dumps(model)
            + ',"system_fingerprint":'
            + _dumps(fingerprint)
            + ',"choices":[{"index":'
        )
        self._head = self._prefix + '0,"delta":'
        self._role_sent = False
        self._roles: set[int] | None = None  # choices after the first whose role was sent

    def _chunk(self, delta: str, finish: str = "null") -> bytes:
        return (self._head + delta + ',"finish_reason":' + finish + "}]}\n\n").encode()

    def _role(self, choice: int = 0) -> str:
        if choice:
            roles = self._roles
            if roles is None:
                roles = self._roles = set()
            elif choice in roles:
                return ""
            roles.add(choice)
            return '"role":"assistant",'
        if self._role_sent:
            return ""
        self._role_sent = True
        return '"role":"assistant",'

    def _choice_chunk(
        self, choice: int, delta: str, finish: str = "null", logprobs: Any = None
    ) -> bytes:
        """Any chunk: another choice than the first (`n` > 1), or one with logprobs."""
        tail = "" if logprobs is None else ',"logprobs":' + _dumps(logprobs)
        return (
            self._prefix
            + str(choice)
            + ',"delta":'
            + delta
            + ',"finish_reason":'
            + finish
            + tail
            + "}]}\n\n"
        ).encode()

    def content(self, text: str, choice: int = 0, logprobs: Any = None) -> bytes:
        """A `data:` line carrying a piece of the reply's text (of choice `choice`, with the
        upstream's `logprobs` for it when the request asked for them)."""
        if choice or logprobs is not None:
            delta = "{" + self._role(choice) + '"content":' + _dumps(text) + "}"
            return self._choice_chunk(choice, delta, logprobs=logprobs)
        if self._role_sent:
            return self._chunk('{"content":' + _dumps(text) + "}")
        return self._chunk("{" + self._role() + '"content":' + _dumps(text) + "}")

    def tool_call(
        self,
        index: int,
        call_id: str | None,
        name: str | None,
        arguments: str,
        choice: int = 0,
    ) -> bytes:
        """A client tool-call fragment; `id`, `type` and `name` only when given (first fragment)."""
        call: dict[str, Any] = {"index": index}
        function: dict[str, Any] = {"arguments": arguments}
        if call_id is not None:
            call["id"] = call_id
            call["type"] = "function"
        if name is not None:
            function["name"] = name
        call["function"] = function
        delta = "{" + self._role(choice) + '"content":null,"tool_calls":[' + _dumps(call) + "]}"
        if choice:
            return self._choice_chunk(choice, delta)
        return self._chunk(delta)

    def finish(self, reason: str, choice: int = 0) -> bytes:
        """The chunk with an empty delta and `finish_reason`; `end` is what streams send."""
        delta = "{" + self._role(choice).rstrip(",") + "}"
        if choice:
            return self._choice_chunk(choice, delta, _dumps(reason))
        return self._chunk(delta, _dumps(reason))

    def end(
        self,
        reason: str,
        usage: tuple[int, int] | None = None,
        others: dict[int, str] | None = None,
    ) -> bytes:
        """A stream's last bytes: the finish chunk (one per choice: `others` holds the
        reasons of choices after the first), the usage chunk if asked for, `[DONE]`."""
        tail = self.finish(reason)
        if others:
            for choice in sorted(others):
                tail += self.finish(others[choice], choice)
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
            "system_fingerprint": self.fingerprint,
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


StartHeaders = Callable[[], list[tuple[bytes, bytes]]]


class EventStreamResponse(Response):
    """`text/event-stream` from an async iterable of ready SSE bytes.

    Who cancels whom: the request's task sends the body; a watcher task waits for the client's
    `http.disconnect` and then cancels the sending task, which closes the body at once (and so
    the brain and its upstream request, or it leaves a speculative generation: llm/turns.py).
    A comment line is sent when nothing was sent for `ping` seconds, so proxies keep the stream
    open through a long server tool. The chunk that ends with `[DONE]` also ends the HTTP body
    (one write fewer per response).

    A pulled body decides the status: the response starts with its first chunk (or the first
    keep-alive), so a body that raises `ApiError` before that is answered as that HTTP error
    (an upstream outage as a 502/503/504 the caller's retries understand), and headers known
    by then (`start_headers`) go out with it. An `ApiError` after the start ends the stream
    with an error event and `[DONE]`. A pushed body (a turn subscription) starts at once.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        body: ClosableBody | PushBody,
        ping: float = 15.0,
        start_headers: StartHeaders | None = None,
    ) -> None:
        """`body` is pulled (an async generator of ready chunks) or pushes itself (a turn
        subscription); either way this response owns it and closes it. `ping`: seconds of
        silence before a keep-alive comment. `start_headers`: called once, when the response
        starts, for headers the body decided by then (a pulled body only)."""
        self.stream_body = body
        self.ping = ping
        self.start_headers = start_headers
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
        self._started = False
        self._starting: asyncio.Future[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._pinger = None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watcher = loop.create_task(self._watch(receive, task))
        self._pinger = loop.call_later(self.ping, self._ping, loop, send, -1)
        metrics.ACTIVE_STREAMS.inc()
        try:  # the body is closed whatever happens: a subscription must always leave
            await self._pump(scope, receive, send)
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

    async def _start(self, send: Send) -> None:
        """Send `http.response.start` exactly once (the pump or the first keep-alive)."""
        if self._started:
            return
        if self._starting is not None:
            await self._starting
            return
        self._starting = asyncio.get_running_loop().create_future()
        headers = self.raw_headers
        if self.start_headers is not None:
            headers = headers + self.start_headers()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        finally:
            self._started = True
            self._starting.set_result(None)

    async def _pump(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.stream_body
        if not isinstance(body, AsyncIterable):
            await self._start(send)
            await body.run(send)
            return
        more = True
        try:
            async for chunk in body:
                if not self._started:
                    await self._start(send)
                more = not chunk.endswith(DONE)
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                self._sent += 1
                if not more:
                    return
        except ApiError as error:
            if not self._started and self._starting is None:
                self._started = True  # no keep-alive may start it now
                await error.response()(scope, receive, send)
                return
            await self._start(send)
            last = encode_event(error.payload()) + DONE
            await send({"type": "http.response.body", "body": last, "more_body": False})
            return
        await self._start(send)
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
            loop.create_task(_quiet(self._keep_alive(send, message)))
        self._pinger = loop.call_later(self.ping, self._ping, loop, send, sent)

    async def _keep_alive(self, send: Send, message: dict[str, Any]) -> None:
        if not self._started:
            await self._start(send)  # the status is 200 from here on
        await send(message)


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
