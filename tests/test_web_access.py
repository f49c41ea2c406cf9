"""The request log (web/access.py): one line per request, with what a person wiring Tavus to
the server needs to find a request, and never a key or a token."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cvi_agent.devtools.fakes.upstream import FakeUpstream
from tests.procs import ServerProcess
from tests.support import API_KEY, ServerFactory, wait_until

CHAT = "/v1/chat/completions"
UPSTREAM_KEY = "sk-upstream-secret"


def _turn(model: str = "storyteller") -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi there"}]}


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "cvi_agent.access"]


async def _logged(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """The access lines once `count` are there (a line is written just after its response
    ended, which the client may see first)."""
    await wait_until(lambda: len(_lines(caplog)) >= count)
    return _lines(caplog)


def _no_secret(records: list[logging.LogRecord]) -> None:
    for record in records:
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert API_KEY not in text and UPSTREAM_KEY not in text, text
        assert API_KEY[:-4] not in text, text


async def test_a_streamed_turn_is_one_line_with_persona_conversation_ttft_and_key(
    serve: ServerFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cvi_agent.access")
    server = serve(upstream)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.post(
            CHAT + "?debug=1&key=leak",
            json=_turn(),
            headers={"authorization": f"Bearer {API_KEY}", "conversation_id": "c-123"},
        )
        assert response.status_code == 200 and "[DONE]" in response.text
        request_id = response.headers["x-request-id"]
    [record] = await _logged(caplog, 1)
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert record.request_id == request_id  # type: ignore[attr-defined]
    assert fields["method"] == "POST" and fields["route"] == CHAT and fields["status"] == 200
    assert fields["persona"] == "storyteller" and fields["conversation_id"] == "c-123"
    assert fields["ttft_ms"] is not None and fields["ttft_ms"] <= fields["duration_ms"]
    assert fields["fallback"] is None
    assert fields["key_last4"] == "…" + API_KEY[-4:]
    message = record.getMessage()
    assert message.startswith(f"POST {CHAT} 200 ") and "persona=storyteller" in message
    assert "debug" not in message and "leak" not in message  # never the query
    _no_secret(_lines(caplog))


async def test_refusals_say_why(
    serve: ServerFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cvi_agent.access")
    server = serve(upstream, rate_limit_rps=0.01, rate_limit_burst=1)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.post(CHAT, json=_turn())).status_code == 401
        wrong = {"authorization": "Bearer wrong-key-0123456789"}
        assert (await http.post(CHAT, json=_turn(), headers=wrong)).status_code == 401
        ok = {"authorization": f"Bearer {API_KEY}"}
        assert (await http.get("/v1/models", headers=ok)).status_code == 200
        assert (await http.get("/v1/models", headers=ok)).status_code == 429
    records = await _logged(caplog, 4)
    got = [(r.fields["status"], r.fields.get("reason")) for r in records]  # type: ignore[attr-defined]
    assert got == [
        (401, "missing_api_key"),
        (401, "invalid_api_key"),
        (200, None),
        (429, "rate_limit_exceeded"),
    ]
    assert "reason=invalid_api_key" in records[1].getMessage()
    assert "wrong-key" not in caplog.text
    _no_secret(records)


async def test_a_fallback_turn_says_which_fallback(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cvi_agent.access")
    server = serve(None)  # the upstream is a closed port
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.post(
            CHAT,
            json=_turn(),
            headers={"x-api-key": API_KEY, "conversation_id": "c-fallback"},
        )
        assert response.status_code == 200
    [record] = await _logged(caplog, 1)
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert fields["status"] == 200 and fields["conversation_id"] == "c-fallback"
    assert fields["fallback"] in ("upstream_unavailable", "upstream_error")
    assert f"fallback={fields['fallback']}" in record.getMessage()
    _no_secret([record])


async def test_an_unmatched_path_is_logged_without_its_query_or_a_forged_line(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cvi_agent.access")
    server = serve(None)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get("/healthz%0Afake line?token=abc", headers={"x-api-key": API_KEY})
        assert response.status_code == 404
    [record] = await _logged(caplog, 1)
    assert "\n" not in record.getMessage() and "token" not in record.getMessage()
    assert record.fields["reason"] == "not_found"  # type: ignore[attr-defined]


def test_json_lines_from_the_real_server_process(tmp_path: Path) -> None:
    """`CVI_LOG_FORMAT=json`: every stderr line is a JSON object; the request lines carry the
    fields; no key appears anywhere in the output."""
    proc = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        env={"CVI_LOG_FORMAT": "json", "CVI_UPSTREAM_API_KEY": UPSTREAM_KEY},
    ).start()
    try:
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            assert http.post(CHAT, json=_turn("echo")).status_code == 401
            ok = http.post(CHAT, json=_turn("echo"), headers={"x-api-key": API_KEY})
            assert ok.status_code == 200
    finally:
        proc.stop()
    out = proc.log_text()
    assert API_KEY not in out and UPSTREAM_KEY not in out
    objects = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    requests = [o for o in objects if o["logger"] == "cvi_agent.access" and o["route"] == CHAT]
    assert [(o["status"], o.get("reason")) for o in requests] == [
        (401, "missing_api_key"),
        (200, None),
    ]
    assert requests[1]["persona"] == "echo" and requests[1]["request_id"].startswith("req_")
    assert requests[1]["ttft_ms"] is not None and requests[1]["key_last4"] == "…" + API_KEY[-4:]


async def test_a_refused_live_feed_handshake_is_one_line_without_its_key(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = serve(None)
    ws_url = server.url.replace("http://", "ws://")
    wrong = "wrong-key-0123456789"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{ws_url}/api/conversations/c1/live?key={wrong}"):
            pass
    assert refused.value.response.status_code == 401
    [record] = await _logged(caplog, 1)
    assert record.fields["status"] == 401  # type: ignore[attr-defined]
    assert record.fields["reason"] == "invalid_api_key"  # type: ignore[attr-defined]
    assert record.getMessage().startswith("WEBSOCKET /api/conversations/c1/live 401 ")
    assert wrong not in record.getMessage()
