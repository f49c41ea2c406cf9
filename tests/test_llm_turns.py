"""Speculative turns over real uvicorn, the fake upstream and the real openai SDK as the client:
supersede, replay, cancellation on disconnect, and no side effects while speculative."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from cvi_agent.llm.brains.base import TurnContext
from cvi_agent.llm.tools import ToolCallContext
from cvi_agent.llm.turns import Generation, GenerationReader
from cvi_agent.protocol.chat import ChatCompletionRequest
from tests.support import API_KEY, ServerFactory, wait_until

SYSTEM = {"role": "system", "content": "You are a storyteller on a live video call."}
BOOKINGS: list[dict[str, Any]] = []


async def book_table(args: dict[str, Any], ctx: ToolCallContext) -> dict[str, Any]:
    """A server tool with side effects: every call is a booking (counted by the tests)."""
    BOOKINGS.append(args)
    return {"booked": True, "party": args.get("party", 2)}


def paced(words: int, gap: float, ttft: float = 0.0, prefix: str = "w") -> Plan:
    return Plan(
        steps=[
            ReplyStep(
                content=f"{prefix}{i}" + (" " if i < words - 1 else ""), sleep=gap if i else 0.0
            )
            for i in range(words)
        ],
        ttft=ttft,
    )


def turn(text: str) -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": text}]


class Wire:
    """One streamed response read through the openai SDK's raw streaming response."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.times: list[float] = []
        self.sent = 0.0
        self.first_event = asyncio.Event()
        self.ended = asyncio.Event()

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]]
        return reasons[-1] if reasons else None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent


async def stream(
    client: openai.AsyncOpenAI,
    wire: Wire,
    messages: list[dict[str, Any]],
    conversation: str | None,
    model: str = "storyteller",
) -> None:
    headers = {"x-conversation-id": conversation} if conversation else {}
    wire.sent = time.monotonic()
    async with client.chat.completions.with_streaming_response.create(
        model=model,
        stream=True,
        messages=messages,  # type: ignore[arg-type]
        extra_headers=headers,
    ) as response:
        async for line in response.iter_lines():
            if line.startswith("data: "):
                wire.events.append(line[6:])
                wire.times.append(time.monotonic())
                wire.first_event.set()
    wire.ended.set()


async def first_event(wire: Wire, task: asyncio.Task[None], within: float = 5.0) -> None:
    """Wait for the first event; fail with the stream's own error if it ended first."""
    waiter = asyncio.ensure_future(wire.first_event.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=within, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if task in done:
        task.result()
    assert wire.first_event.is_set(), "no first event in time"


@pytest.fixture
async def sdk(server: LoopbackServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=API_KEY, max_retries=0
    ) as client:
        yield client


def cancelled(reason: str) -> float:
    return REGISTRY.get_sample_value("cvi_turns_cancelled_total", {"reason": reason}) or 0.0


async def turn_records(server: LoopbackServer, cid: str, count: int) -> list[dict[str, Any]]:
    """The conversation's `llm.turn` payloads, once `count` are recorded (within 5 s)."""
    deadline = time.monotonic() + 5
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        while True:
            resp = await http.get(f"/api/conversations/{cid}/events")
            # 404 until the recorder (off the hot path, batched) stored the first turn
            events = resp.json()["data"] if resp.status_code == 200 else []
            turns = [e["payload"] for e in events if e["kind"] == "llm.turn"]
            if len(turns) >= count or time.monotonic() > deadline:
                return turns
            await asyncio.sleep(0.05)


async def test_longer_transcript_supersedes_the_running_generation(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream, server: LoopbackServer
) -> None:
    upstream.push(paced(40, 0.05, prefix="old"), paced(3, 0.0, prefix="new"))
    old, new = Wire(), Wire()
    old_task = asyncio.create_task(stream(sdk, old, turn("Tell me a story"), "conv-super"))
    await first_event(old, old_task)

    superseded_at = time.monotonic()
    await stream(sdk, new, turn("tell me a story, about a fox!"), "conv-super")
    await asyncio.wait_for(old.ended.wait(), 2)
    await old_task

    # The superseded stream ended cleanly while its caller was still listening...
    assert old.events[-1] == "[DONE]"
    assert old.finish_reason == "stop"
    assert old.text.startswith("old0 ") and len(old.text.split()) < 40
    # ...and its upstream request was closed at once, long before its reply would have ended.
    first = upstream.records[0]
    assert first.disconnected is not None
    assert first.disconnected - superseded_at < 0.5
    assert first.chunks_sent < 40
    assert new.text == "new0 new1 new2"
    assert new.events[-1] == "[DONE]"
    # The record tells the two apart (the console shows it): one superseded, one answered.
    turns = await turn_records(server, "conv-super", 2)
    assert sorted(t["superseded"] for t in turns) == [False, True], turns
    assert all(t["replayed"] is False and t["fallback"] is False for t in turns)
    [answered] = [t for t in turns if not t["superseded"]]
    assert 0 < answered["upstream_ttft_ms"] <= answered["ttft_ms"], answered  # ours: the rest


async def test_unrelated_request_does_not_supersede(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(paced(8, 0.03, prefix="a"), paced(2, 0.0, prefix="b"))
    first, second = Wire(), Wire()
    task = asyncio.create_task(stream(sdk, first, turn("what is the weather"), "conv-other"))
    await first_event(first, task)
    await stream(sdk, second, turn("tell me a story"), "conv-other")
    await task
    assert first.text == " ".join(f"a{i}" for i in range(8))
    assert upstream.records[0].disconnected is None


async def test_final_request_replays_the_speculative_generation(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream, server: LoopbackServer
) -> None:
    upstream.push(paced(12, 0.03, ttft=1.0, prefix="tok"))
    speculative, final = Wire(), Wire()
    spec_task = asyncio.create_task(
        stream(sdk, speculative, turn("Tell me a story."), "conv-replay")
    )
    await first_event(speculative, spec_task)
    # The final request: same words, other case and punctuation.
    final_task = asyncio.create_task(stream(sdk, final, turn("tell me a STORY"), "conv-replay"))
    await first_event(final, final_task)
    spec_task.cancel()  # Tavus abandons the speculative stream
    await asyncio.gather(spec_task, return_exceptions=True)
    await final_task

    # First token without waiting for the model (the upstream takes 1 s to its first token).
    assert final.ttft < 0.5, final.ttft
    assert final.text == " ".join(f"tok{i}" for i in range(12))
    assert final.events[-1] == "[DONE]" and final.finish_reason == "stop"
    assert len(upstream.records) == 1, "the final request did not reach the upstream"
    assert upstream.records[0].disconnected is None  # the speculative close did not cancel it

    # Finished, and still replayable within the window.
    again = Wire()
    await stream(sdk, again, turn("tell me a story"), "conv-replay")
    assert again.text == final.text and again.ttft < 0.5
    assert len(upstream.records) == 1
    # The record says which answers were replays.
    turns = await turn_records(server, "conv-replay", 3)
    assert sum(t["replayed"] for t in turns) == 2, turns


async def test_replay_window_expires(serve: ServerFactory, upstream: FakeUpstream) -> None:
    srv = serve(upstream, replay_window=0.3)
    upstream.push(paced(2, 0.0, prefix="x"), paced(2, 0.0, prefix="y"))
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        first, second = Wire(), Wire()
        await stream(c, first, turn("hello there"), "conv-window")
        await asyncio.sleep(0.6)
        await stream(c, second, turn("hello there"), "conv-window")
    assert (first.text, second.text) == ("x0 x1", "y0 y1")
    assert len(upstream.records) == 2


async def test_without_conversation_id_nothing_is_shared(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(paced(2, 0.0, prefix="x"), paced(2, 0.0, prefix="y"))
    first, second = Wire(), Wire()
    await stream(sdk, first, turn("hello there"), None)
    await stream(sdk, second, turn("hello there"), None)
    assert (first.text, second.text) == ("x0 x1", "y0 y1")
    assert len(upstream.records) == 2


@pytest.mark.parametrize("conversation", [None, "conv-gone"])
async def test_client_disconnect_closes_the_upstream_request(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream, conversation: str | None
) -> None:
    upstream.push(paced(100, 0.05))
    reason = "abandoned" if conversation else "client_disconnect"
    cancelled_before = cancelled(reason)
    wire = Wire()
    task = asyncio.create_task(stream(sdk, wire, turn("talk for a long time"), conversation))
    await first_event(wire, task)
    task.cancel()  # the client goes away mid-answer
    await asyncio.gather(task, return_exceptions=True)
    closed_at = time.monotonic()
    await wait_until(lambda: upstream.records[0].disconnected is not None, within=2.0)
    disconnected = upstream.records[0].disconnected
    assert disconnected is not None and disconnected - closed_at < 2.0
    assert upstream.records[0].chunks_sent < 100
    reason = "abandoned" if conversation else "client_disconnect"
    await wait_until(lambda: cancelled(reason) > cancelled_before)


# ---------------------------------------------------------------- side effects


@pytest.fixture
def booking_server(serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path) -> LoopbackServer:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "host.yaml").write_text(
        json.dumps(
            {
                "name": "host",
                "persona_name": "Host",
                "brain": {"kind": "upstream", "model": "fake"},
                "tools": [
                    {
                        "execution": "server",
                        "side_effects": True,
                        "handler": "tests.test_llm_turns:book_table",
                        "function": {
                            "name": "book_table",
                            "parameters": {"type": "object", "properties": {}},
                        },
                    }
                ],
            }
        )
    )
    BOOKINGS.clear()
    return serve(upstream, personas_dir=personas, side_effect_settle=1.0)


def booking_plan(party: int) -> Plan:
    return Plan(
        steps=[
            ReplyStep(tool_name="book_table", tool_id=f"call_{party}"),
            ReplyStep(tool_arguments=json.dumps({"party": party})),
        ],
        finish_reason="tool_calls",
    )


async def test_superseded_request_never_runs_a_side_effecting_tool(
    booking_server: LoopbackServer, upstream: FakeUpstream
) -> None:
    # Both the speculative and the final request make the model call the booking tool.
    upstream.push(booking_plan(2), booking_plan(4))
    async with openai.AsyncOpenAI(
        base_url=booking_server.url + "/v1", api_key=API_KEY, max_retries=0
    ) as c:
        speculative, final = Wire(), Wire()
        spec_task = asyncio.create_task(
            stream(c, speculative, turn("book a table"), "conv-book", model="host")
        )
        await wait_until(lambda: len(upstream.records) == 1)
        await asyncio.sleep(0.1)  # the model asked for the tool; the turn may still grow
        await stream(c, final, turn("book a table for four people"), "conv-book", model="host")
        await asyncio.wait_for(spec_task, 2)

    assert BOOKINGS == [{"party": 4}], "only the final request may book"
    assert speculative.events[-1] == "[DONE]" and speculative.text == ""
    assert final.text.startswith("The tool said:") and '"booked": true' in final.text
    # The upstream saw: speculative round 1, final round 1, final round 2 with the tool result.
    assert len(upstream.records) == 3
    assert upstream.records[2].body["messages"][-1]["role"] == "tool"


async def test_abandoned_request_never_runs_a_side_effecting_tool(
    booking_server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(booking_plan(2))
    async with openai.AsyncOpenAI(
        base_url=booking_server.url + "/v1", api_key=API_KEY, max_retries=0
    ) as c:
        wire = Wire()
        task = asyncio.create_task(stream(c, wire, turn("book a table"), "conv-gone", model="host"))
        await wait_until(lambda: len(upstream.records) == 1)
        await asyncio.sleep(0.1)
        task.cancel()  # Tavus abandons the speculative request
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(1.3)  # past the settle delay
    assert BOOKINGS == []
    assert len(upstream.records) == 1


async def test_final_request_runs_the_tool_once_after_the_settle_delay(
    booking_server: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(booking_plan(3))
    async with openai.AsyncOpenAI(
        base_url=booking_server.url + "/v1", api_key=API_KEY, max_retries=0
    ) as c:
        held, free = Wire(), Wire()
        await stream(c, held, turn("book a table for three"), "conv-settle", model="host")
        upstream.push(booking_plan(5))
        await stream(c, free, turn("book a table for five"), None, model="host")
    assert BOOKINGS == [{"party": 3}, {"party": 5}]
    # Held until the conversation had been quiet for the settle delay; no conversation id: at once.
    assert held.ttft >= 0.9
    assert free.ttft < 0.9


def _live(*kinds: type) -> int:
    """Objects of these types the GC tracks: alive, or garbage only the cyclic GC would free."""
    return sum(1 for o in gc.get_objects() if type(o) in kinds)


async def test_turn_state_is_freed_by_refcounting_once_forgotten(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """A finished conversation leaves nothing behind: the tracker forgets its generations
    after the replay window, and, with the cyclic GC off, the generations, their requests and
    their events are freed all the same (no reference cycle). Under load (`cvi-agent soak`) a
    cycle here let ~100 MB of answered requests wait for a full collection."""
    srv = serve(upstream, replay_window=0.2)
    app: Any = srv.server.config.app
    tracker = app.state.runtime.chat.turns
    kinds = (Generation, TurnContext, ChatCompletionRequest, GenerationReader)
    gc.collect()
    gc.disable()
    try:
        before = _live(*kinds)
        async with httpx.AsyncClient(
            base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        ) as http:
            for n in range(20):
                headers = {"x-conversation-id": f"conv-freed-{n}"}
                for text, final in (("tell me", False), ("tell me a story", True)):
                    body = {"model": "storyteller", "stream": True, "messages": turn(text)}
                    async with http.stream(
                        "POST", "/v1/chat/completions", json=body, headers=headers
                    ) as resp:
                        async for line in resp.aiter_lines():
                            if line.startswith("data: ") and not final:
                                break  # speculative: abandoned after its first chunk
        await wait_until(lambda: not tracker._conversations, within=5)
        await asyncio.sleep(0.1)
        left = _live(*kinds) - before
    finally:
        gc.enable()
    assert left <= 0, f"{left} turn objects wait for the cyclic GC"
