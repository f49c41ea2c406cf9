"""The chat route served as plain ASGI beside FastAPI's routing (web/direct.py): the same
answers, the same scope for middleware around it, everything else still routed by FastAPI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from cvi_agent.app import create_app
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.llm import routes
from cvi_agent.web.direct import DirectRoutes
from tests.support import API_KEY, make_settings, wait_until

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT: Any = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


class Seen:
    """A pure-ASGI middleware added after the app was built (as a request log would be): what
    it sees of each request once the request has been answered."""

    lines: list[tuple[str, str, str | None, Any, int]]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if scope["type"] == "http":
            route = getattr(scope.get("route"), "path", None)
            Seen.lines.append(
                (scope["method"], scope["path"], route, scope.get("endpoint"), status)
            )


@pytest.fixture
def logged(tmp_path: Path, upstream: FakeUpstream) -> Iterator[LoopbackServer]:
    Seen.lines = []
    settings = make_settings(tmp_path, upstream.url)  # type: ignore[attr-defined]
    app = create_app(settings)
    app.add_middleware(Seen)
    with LoopbackServer(app, settings=settings) as server:
        yield server


async def test_the_chat_paths_are_served_directly_and_seen_by_middleware(
    logged: LoopbackServer,
) -> None:
    async with httpx.AsyncClient(base_url=logged.url) as http:
        plain = await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        stream = await http.post("/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        refused = await http.post("/v1/chat/completions", json=CHAT)
        invalid = await http.post("/v1/chat/completions", json={"model": "echo"}, headers=AUTH)
        wrong_method = await http.get("/v1/chat/completions", headers=AUTH)
        models = await http.get("/v1/models", headers=AUTH)
    assert plain.status_code == 200 and plain.json()["object"] == "chat.completion"
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    assert refused.status_code == 401  # access control, outside
    assert invalid.status_code == 400
    assert invalid.json()["error"]["code"] == "invalid_request"
    assert wrong_method.status_code == 405  # not a direct pair: FastAPI's router answers
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert models.status_code == 200
    # The middleware notes a request once its response has gone out: a moment after the client
    # has read it.
    await wait_until(lambda: len(Seen.lines) == 6)
    chat = routes.chat_endpoint
    assert Seen.lines[:2] == [
        ("POST", "/v1/chat/completions", "/v1/chat/completions", chat, 200),
        ("POST", "/chat/completions", "/chat/completions", chat, 200),
    ]
    assert Seen.lines[3] == ("POST", "/v1/chat/completions", "/v1/chat/completions", chat, 400)
    assert Seen.lines[5][2:] == ("/v1/models", routes.list_models, 200)


async def test_an_unexpected_error_is_a_500_naming_the_route(
    logged: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(routes, "chat_completions", broken)
    with caplog.at_level(logging.ERROR):
        async with httpx.AsyncClient(base_url=logged.url) as http:
            resp = await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert resp.headers["x-request-id"].startswith("req_")
    assert "unhandled error on POST /v1/chat/completions" in caplog.text


async def test_what_is_not_an_exact_pair_goes_to_the_app() -> None:
    """Other types, methods, paths and a `root_path` (the router strips it) are the app's."""
    calls: list[str] = []

    async def direct(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append("direct " + scope["route"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append("app")

    async def nothing() -> Any:
        return {}

    async def ignore(message: Any) -> None:
        return None

    mw = DirectRoutes(app, {("POST", "/x"): (direct, "/x")})  # type: ignore[dict-item]
    base = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    for scope in (
        base,
        {**base, "method": "GET"},
        {**base, "path": "/x/"},
        {**base, "root_path": "/api"},
        {**base, "type": "websocket"},
    ):
        await mw(dict(scope), nothing, ignore)
    assert calls == ["direct /x", "app", "app", "app", "app"]
