"""The proxy path (httpx) against the fake upstream: same events, same request on the wire as
the direct transports (test_llm_upstream_client.py), and taken only when a proxy applies."""

from __future__ import annotations

import pytest

from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.llm.upstream.client import ChatStreamClient, TransportName
from cvi_agent.llm.upstream.proxy import proxy_for
from tests.upstream_support import PARAMS, collect


async def test_events_and_request_on_the_wire(upstream: FakeUpstream) -> None:
    upstream.push(upstream.reply("Once upon a time"))
    client = ChatStreamClient(upstream.url + "/v1", "sk-test", force_proxy=True)  # type: ignore[attr-defined]
    try:
        assert client.via_proxy
        events = await collect(client)
    finally:
        await client.aclose()
    contents = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert "".join(c or "" for c in contents) == "Once upon a time"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["total_tokens"] > 0
    record = upstream.records[-1]
    assert record.body == PARAMS  # exactly what we sent, unicode intact
    assert record.headers["authorization"] == "Bearer sk-test"
    assert record.headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("transport", ["httptools", "aiohttp"])
async def test_proxy_taken_only_when_one_applies(
    monkeypatch: pytest.MonkeyPatch, transport: TransportName
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert proxy_for("https://api.example/v1") == "http://proxy.invalid:3128"
    assert proxy_for("https://internal.example/v1") is None
    assert proxy_for("http://api.example/v1") is None  # no proxy named for plain HTTP
    proxied = ChatStreamClient("https://api.example/v1", "k", transport=transport)
    direct = ChatStreamClient("https://internal.example/v1", "k", transport=transport)
    try:
        assert proxied.via_proxy and not direct.via_proxy
    finally:
        await proxied.aclose()
        await direct.aclose()
