"""`x-request-id` on every response (web/request_id.py): a caller's own echoed when usable, else
a fresh one; the SDKs expose it; log lines written while a request is handled carry it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan
from cvi_agent.web.logs import log_config
from cvi_agent.web.request_id import RequestIdFormatter
from tests.support import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT: Any = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def test_every_response_carries_one(server: LoopbackServer) -> None:
    """Fails before: no response had an `x-request-id`."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        responses = [
            await http.post("/v1/chat/completions", json=CHAT, headers=AUTH),
            await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH),
            await http.post("/v1/chat/completions", json=CHAT),  # 401, from the middleware
            await http.post("/v1/chat/completions", json={"model": "x"}, headers=AUTH),  # 400
            await http.get("/v1/models/ghost", headers=AUTH),  # 404
            await http.get("/healthz"),
            await http.get("/openapi.json"),
        ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i is not None and i.startswith("req_") and len(i) == 28 for i in ids), ids
    assert len(set(ids)) == len(ids), "each request its own"
    assert [r.headers.get_list("x-request-id") for r in responses[:1]] == [[ids[0]]]


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("trace-42:abc/def+1=@x", True),
        ("x" * 128, True),
        ("x" * 129, False),  # bounded
        ("has space", False),
        ("semi;colon", False),
        ("", False),
    ],
)
async def test_a_callers_id_is_echoed_when_safe(
    server: LoopbackServer, sent: str, echoed: bool
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post(
            "/v1/chat/completions", json=CHAT, headers={**AUTH, "x-request-id": sent}
        )
    assert resp.status_code == 200
    got = resp.headers["x-request-id"]
    assert (got == sent) is echoed
    if not echoed:
        assert got.startswith("req_")


async def test_the_sdk_sees_it(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(**CHAT)
    assert completion._request_id is not None and completion._request_id.startswith("req_")
    raw = await client.chat.completions.with_raw_response.create(
        **CHAT, extra_headers={"x-request-id": "mine-1"}
    )
    assert raw.request_id == "mine-1"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("ghost")
    assert missing.value.request_id is not None


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every line the `cvi_agent` loggers write, formatted as `cvi-agent serve` formats them."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.WARNING)
    handler.setFormatter(RequestIdFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cvi_agent")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


async def test_log_lines_of_a_request_carry_its_id(
    server: LoopbackServer, upstream: FakeUpstream, log_lines: list[str]
) -> None:
    upstream.push(Plan(status=500))
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": "storyteller", "messages": [{"role": "user", "content": "x"}]},
            headers={**AUTH, "x-request-id": "find-me-7"},
        )
    assert resp.status_code == 502
    failures = [line for line in log_lines if "brain failed" in line]
    assert failures and all(line.endswith(" request_id=find-me-7") for line in failures)
    logging.getLogger("cvi_agent.test").warning("outside any request")
    assert log_lines[-1].endswith("outside any request")


async def test_a_refused_websocket_handshake_carries_one(server: LoopbackServer) -> None:
    ws_url = server.url.replace("http://", "ws://")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url + "/api/conversations/c1/live"):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["x-request-id"].startswith("req_")


def test_served_logs_use_the_request_id_formatter() -> None:
    """`cvi-agent serve` (and its worker processes) configure logging from `log_config`."""
    formatter = log_config("info")["formatters"]["default"]
    assert formatter["class"] == "cvi_agent.web.request_id.RequestIdFormatter"
