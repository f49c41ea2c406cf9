"""Upstream faults, with the real openai SDK as the caller: whatever the upstream does, the
caller gets a valid SSE stream ending with [DONE] within the persona's first-token budget; the
fallback chain (a second upstream, then a spoken line) and the circuit breaker. These personas
speak their fallback line (`on_upstream_failure: speak`); tests/test_llm_failure.py covers the
`error` answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY, ServerFactory

FALLBACK_LINE = "Sorry, give me one second."


@pytest.fixture
def backup() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with LoopbackServer(fake) as server:
        fake.url = server.url  # type: ignore[attr-defined]
        yield fake


def personas_dir(
    tmp_path: Path, primary: str, backup: str, budget: float = 1.0, reply: float = 30
) -> Path:
    d = tmp_path / "personas"
    d.mkdir(exist_ok=True)
    (d / "chain.yaml").write_text(
        f"""
name: chain
persona_name: Chain
brain:
  kind: upstream
  model: primary-model
  base_url: {primary}/v1
  first_token_timeout: {budget}
  reply_timeout: {reply}
  fallbacks:
    - {{model: backup-model, base_url: "{backup}/v1"}}
fallback_text: "{FALLBACK_LINE}"
on_upstream_failure: speak
"""
    )
    (d / "single.yaml").write_text(
        f"""
name: single
persona_name: Single
brain: {{kind: upstream, model: m, base_url: "{primary}/v1", first_token_timeout: {budget}, reply_timeout: {reply}}}
fallback_text: "{FALLBACK_LINE}"
on_upstream_failure: speak
"""
    )
    return d


async def ask(server: LoopbackServer, model: str) -> tuple[str, str | None, float]:
    """(text, finish_reason, seconds) of one streamed request; the SDK validates the stream."""
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        stream = await c.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": "hello"}]
        )
        text, finish = [], None
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish, time.monotonic() - started


FAULTS = {
    "http_500": Plan(status=500),
    "http_429": Plan(
        status=429, error_body={"error": {"message": "slow down", "type": "rate_limit"}}
    ),
    "no_first_token": Plan(ttft=5.0, steps=[ReplyStep(content="too late")]),
    "malformed_chunk": Plan(raw_chunks=[b"data: {not json at all\n\n", b"data: [DONE]\n\n"]),
    "error_event": Plan(raw_chunks=[b'data: {"error": {"message": "overloaded"}}\n\n']),
    "empty_reply": Plan(steps=[], finish_reason="stop"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_falls_back_to_second_upstream(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path, fault: str
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, backup.url))  # type: ignore[attr-defined]
    upstream.push(FAULTS[fault])
    backup.push(backup.reply("the backup answered"))
    text, finish, seconds = await ask(server, "chain")
    assert text == "the backup answered" and finish == "stop"
    assert seconds < 1.5, "within the first-token budget (1 s) plus the reply"
    assert backup.records[-1].body["model"] == "backup-model"


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_without_backup_speaks_fallback_line(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path, fault: str
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, "http://127.0.0.1:9"))  # type: ignore[attr-defined]
    upstream.push(FAULTS[fault])
    text, finish, seconds = await ask(server, "single")
    assert text == FALLBACK_LINE and finish == "stop"
    assert seconds < 1.5


async def test_connection_refused_then_dead_backup(serve: ServerFactory, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = serve(None, personas_dir=personas_dir(tmp_path, dead, dead))
    text, finish, seconds = await ask(server, "chain")
    assert text == FALLBACK_LINE and finish == "stop" and seconds < 1.5


async def test_reset_mid_reply_ends_cleanly(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    server = serve(None, personas_dir=personas_dir(tmp_path, upstream.url, backup.url))  # type: ignore[attr-defined]
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ") for i in range(10)], reset_after=3))
    text, finish, _ = await ask(server, "chain")
    assert text == "w0 w1 w2 " and finish == "stop"
    assert backup.records == [], "a reply already under way is not restarted elsewhere"


async def test_trickle_is_cut_at_the_reply_budget(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    dir_ = personas_dir(tmp_path, upstream.url, backup.url, reply=2.5)  # type: ignore[attr-defined]
    server = serve(None, personas_dir=dir_)
    upstream.push(
        Plan(steps=[ReplyStep(content=f"t{i} ", sleep=1.0 if i else 0.0) for i in range(30)])
    )
    text, finish, seconds = await ask(server, "chain")
    assert text.startswith("t0 t1 ") and finish == "length"
    assert 2.4 < seconds < 4.5
    deadline = time.monotonic() + 2.0
    while upstream.records[-1].disconnected is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.records[-1].disconnected is not None, "the trickling upstream was closed"


async def test_circuit_breaker_stops_hammering_a_dead_upstream(
    serve: ServerFactory, upstream: FakeUpstream, backup: FakeUpstream, tmp_path: Path
) -> None:
    server = serve(
        None,
        personas_dir=personas_dir(tmp_path, upstream.url, backup.url),  # type: ignore[attr-defined]
        breaker_failures=3,
        breaker_reset=1.0,
    )
    for _ in range(8):
        upstream.push(Plan(status=503))
    for _ in range(8):
        text, _, _ = await ask(server, "chain")
        assert text.startswith("word0"), "the backup answers every time"
    assert len(upstream.records) == 3, "after 3 failures the primary is skipped"
    assert len(backup.records) == 8
    time.sleep(1.1)  # half-open: one trial goes to the primary again
    upstream.plans.clear()
    upstream.push(upstream.reply("primary is back"))
    text, _, _ = await ask(server, "chain")
    assert text == "primary is back"
    text, _, _ = await ask(server, "chain")
    assert len(upstream.records) == 5, "closed again: the primary takes the traffic"
