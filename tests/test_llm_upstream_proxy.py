"""The proxy path (httpx) against the fake upstream: same events, same request on the wire as
the direct transports (test_llm_upstream_client.py), and taken only when a proxy applies."""

from __future__ import annotations

import pytest

from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.llm.upstream.client import ChatStreamClient, TransportName
from cvi_agent.llm.upstream.proxy import proxy_for
from tests.upstream_support import assert_story_relayed


async def test_events_and_request_on_the_wire(upstream: FakeUpstream) -> None:
    client = ChatStreamClient(upstream.url + "/v1", "sk-test", force_proxy=True)  # type: ignore[attr-defined]
    assert client.via_proxy
    await assert_story_relayed(client, upstream)


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
