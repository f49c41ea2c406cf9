"""`GET /metrics`: Prometheus text, behind the API key, counting what a user would look for."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai

from cvi_agent import metrics
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from tests.support import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER: Any = {"type": "function", "function": {"name": "get_current_weather"}}


def sample(text: str, metric_name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == metric_name and got == want:
            return float(value)
    return 0.0


async def scrape(http: httpx.AsyncClient) -> str:
    resp = await http.get("/metrics", headers=AUTH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


async def test_metrics_require_the_api_key(server: LoopbackServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


async def test_requests_first_tokens_and_errors_are_counted(
    server: LoopbackServer, client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content="Once "), ReplyStep(content="upon.")], ttft=0.05))
    async with httpx.AsyncClient(base_url=server.url) as http:
        before = await scrape(http)
        stream = await client.chat.completions.create(
            model="storyteller", stream=True, messages=[{"role": "user", "content": "a story"}]
        )
        async with stream:
            async for _ in stream:
                pass
        await http.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            headers=AUTH,
        )
        await http.post("/v1/chat/completions", json={"model": "echo"})
        after = await scrape(http)

    def delta(metric_name: str, **labels: str) -> float:
        return sample(after, metric_name, **labels) - sample(before, metric_name, **labels)

    assert delta("cvi_chat_requests_total", persona="storyteller", status="200") == 1
    assert delta("cvi_chat_requests_total", persona="unknown", status="404") == 1
    assert delta("cvi_chat_requests_total", persona="unknown", status="401") == 1
    assert delta("cvi_time_to_first_token_seconds_count", persona="storyteller") == 1
    upstream_ttft = delta("cvi_upstream_time_to_first_token_seconds_sum", persona="storyteller")
    assert 0.04 < upstream_ttft < 2.0
    assert delta("cvi_added_overhead_seconds_count", persona="storyteller") == 1
    assert sample(after, "cvi_active_streams") == 0


async def test_turn_and_tool_counters(
    server: LoopbackServer, client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    async def run(text: str, conversation: str) -> None:
        stream = await client.chat.completions.create(
            model="weather",
            stream=True,
            messages=[{"role": "user", "content": text}],
            tools=[WEATHER],  # as Tavus declares the persona's client tools
            extra_headers={"x-conversation-id": conversation},
        )
        async with stream:
            async for _ in stream:
                pass

    upstream.push(
        Plan(steps=[ReplyStep(content=f"w{i} ", sleep=0.05) for i in range(30)]),
        Plan(
            steps=[
                ReplyStep(tool_name="get_current_weather", tool_id="call_1"),
                ReplyStep(tool_arguments='{"location": "Paris"}'),
            ]
        ),
    )
    async with httpx.AsyncClient(base_url=server.url) as http:
        before = await scrape(http)
        first = asyncio.create_task(run("what's the", "conv-m"))
        await asyncio.sleep(0.3)
        await run("what's the weather in Paris", "conv-m")  # supersedes the first
        await first
        await run("What's the weather in Paris?", "conv-m")  # replays the second
        after = await scrape(http)

    def delta(metric_name: str, **labels: str) -> float:
        return sample(after, metric_name, **labels) - sample(before, metric_name, **labels)

    assert delta("cvi_turns_superseded_total") == 1
    assert delta("cvi_turns_replayed_total") == 1
    assert (
        delta(
            "cvi_tool_calls_total",
            name="get_current_weather",
            execution="client",
            outcome="streamed",
        )
        == 1
    )


def tool_label_values(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("cvi_tool_calls_total{"):
            labels = line.split("{", 1)[1].split("}", 1)[0]
            for pair in labels.split(","):
                key, _, value = pair.partition("=")
                if key == "name":
                    names.add(value.strip('"'))
    return names


async def test_tool_names_made_up_by_the_model_do_not_grow_the_metrics(
    server: LoopbackServer, upstream: FakeUpstream
) -> None:
    """`cvi_tool_calls`' name label comes from model output: 1,000 distinct made-up names
    (and 150 names declared by requests) give a bounded set of label values."""
    bogus = [ReplyStep(tool_name=f"bogus_{i}", tool_id=f"call_{i}") for i in range(1000)]
    declared = [ReplyStep(tool_name=f"declared_{i}", tool_id=f"call_{i}") for i in range(150)]
    said = ReplyStep(content="Calling. ")  # (a reply of dropped calls only would be empty)
    upstream.push(Plan(steps=[said, *bogus]), Plan(steps=[said, *declared]))
    request_tools = [
        {"type": "function", "function": {"name": f"declared_{i}", "parameters": {}}}
        for i in range(150)
    ]
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
        before = tool_label_values(await scrape(http))
        for tools in (None, request_tools):
            body = {
                "model": "weather",
                "stream": True,
                "messages": [{"role": "user", "content": "call everything"}],
                **({"tools": tools} if tools else {}),
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = [line async for line in resp.aiter_lines()]
            assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        after = tool_label_values(await scrape(http))
    new = after - before
    assert "other" in after
    assert not any(name.startswith("bogus_") for name in after)
    assert len(new) <= metrics.MAX_REQUEST_TOOL_LABELS + 1, len(new)
    assert len([n for n in after if n.startswith("declared_")]) <= metrics.MAX_REQUEST_TOOL_LABELS
    assert "declared_0" in after  # a name the request declared is counted as itself
