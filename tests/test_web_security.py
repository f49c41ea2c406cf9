"""Access control over real uvicorn: every route of the app refuses a missing and a wrong API
key (enumerated from `app.routes`, so a route added later without protection fails here) except
an explicit allow-list; the per-key rate limit; CORS closed by default; callback tokens."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cvi_agent.app import create_app
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.web.security import RateLimiter
from tests.support import API_KEY, ROOT, ServerFactory, make_settings

TOKEN = "cb-token-security-0123456789"
OLD_TOKEN = "cb-token-security-previous-01"
WRONG_KEY = "wrong-key-0123456789"

# The allow-list: (method, path template) -> why no API key is needed. Anything not listed must
# answer 401 without a key. A change here is a security decision: document it in README.md.
PUBLIC = {
    ("GET", "/healthz"): "liveness probe",
    ("GET", "/readyz"): "readiness probe (names a failing part, never its details)",
    ("GET", "/"): "the console page (it asks for the key in the browser)",
    ("GET", "/console"): "the console's static files",
    ("GET", "/favicon.ico"): "the console's tab icon (an image: no secret)",
    ("GET", "/docs"): "OpenAPI docs: describe the API, hold no secret",
    ("HEAD", "/docs"): "OpenAPI docs",
    ("GET", "/docs/oauth2-redirect"): "OpenAPI docs",
    ("HEAD", "/docs/oauth2-redirect"): "OpenAPI docs",
    ("GET", "/redoc"): "OpenAPI docs",
    ("HEAD", "/redoc"): "OpenAPI docs",
    ("GET", "/openapi.json"): "OpenAPI docs",
    ("HEAD", "/openapi.json"): "OpenAPI docs",
}
TOKEN_PROTECTED = {
    ("POST", "/callbacks/tavus"): "?token= (CVI_CALLBACK_TOKEN)",
    ("POST", "/callbacks/argil"): "?token= (CVI_CALLBACK_TOKEN)",
    ("POST", "/callbacks/argil/{path_token}"): "token in the path (CVI_CALLBACK_TOKEN)",
    ("POST", "/callbacks/jogg"): "X-Webhook-Signature HMAC, or ?token=",
}


def flat_routes(app: FastAPI) -> list[tuple[BaseRoute, str, set[str] | None]]:
    """(route, effective path, methods) of every route, through included routers (newer
    FastAPI wraps them; older ones list the routes themselves)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - FastAPI before included-router contexts
        return [(r, getattr(r, "path", ""), getattr(r, "methods", None)) for r in app.routes]
    return [(c.original_route, c.path or "", c.methods) for c in iter_route_contexts(app.routes)]


def endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path template) the app routes, websockets as ("WS", path)."""
    found: list[tuple[str, str]] = []
    for route, path, methods in flat_routes(app):
        if isinstance(route, APIWebSocketRoute | WebSocketRoute):
            found.append(("WS", path))
        elif isinstance(route, APIRoute | Route):
            found += [(method, path) for method in sorted(methods or ())]
        elif isinstance(route, Mount):
            found.append(("GET", path))  # static files
        else:  # a new kind of route must be classified here
            raise AssertionError(f"unclassified route {route!r}")
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "probe-x", path)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[FastAPI, LoopbackServer]]:
    settings = make_settings(
        tmp_path,
        callback_token=f"{TOKEN},{OLD_TOKEN}",
        jogg_webhook_secret="jogg-secret-0123456789",
        run_worker=False,
    )
    app = create_app(settings)
    with LoopbackServer(app) as server:
        yield app, server


def assert_openai_401(resp: httpx.Response, code: str) -> None:
    assert resp.status_code == 401, (resp.request.method, resp.request.url, resp.text)
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == code
    assert API_KEY not in resp.text and WRONG_KEY not in resp.text


async def test_every_route_needs_a_key_except_the_allow_list(
    secured: tuple[FastAPI, LoopbackServer],
) -> None:
    app, server = secured
    routes = endpoints(app)
    listed = set(PUBLIC) | set(TOKEN_PROTECTED)
    assert listed <= set(routes), f"stale allow-list entries: {listed - set(routes)}"
    protected = [r for r in routes if r not in listed]
    assert len(protected) >= 10  # the LLM routes, the API, metrics, simulations, the live feed
    ws_url = server.url.replace("http://", "ws://")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for method, template in protected:
            path = concrete(template)
            if method == "WS":
                for extra in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}):
                    with pytest.raises(InvalidStatus) as refused:
                        async with connect(ws_url + path, additional_headers=extra):
                            pass
                    response = refused.value.response
                    assert response.status_code == 401, (template, extra)
                    assert b'"authentication_error"' in (response.body or b"")
                for query in (f"?key={WRONG_KEY}",):
                    with pytest.raises(InvalidStatus) as refused:
                        async with connect(ws_url + path + query):
                            pass
                    assert refused.value.response.status_code == 401
                continue
            body = b'{"probe": true}' if method in ("POST", "PUT", "PATCH") else None
            headers = {"content-type": "application/json"}
            missing = await http.request(method, path, content=body, headers=headers)
            wrong = await http.request(
                method, path, content=body, headers={**headers, "x-api-key": WRONG_KEY}
            )
            wrong_bearer = await http.request(
                method,
                path,
                content=body,
                headers={**headers, "Authorization": f"Bearer {WRONG_KEY}"},
            )
            if method == "HEAD":  # no body to read the error from
                assert missing.status_code == wrong.status_code == 401, template
                continue
            assert_openai_401(missing, "missing_api_key")
            assert_openai_401(wrong, "invalid_api_key")
            assert_openai_401(wrong_bearer, "invalid_api_key")
            assert missing.headers["www-authenticate"] == "Bearer"
            # ...and the right key gets past the gate (to a 2xx/4xx of the route itself).
            ok = await http.request(
                method, path, content=body, headers={**headers, "x-api-key": API_KEY}
            )
            assert ok.status_code != 401 and ok.status_code < 500, (method, template, ok.text)

        for method, template in PUBLIC:
            path = concrete(template) + ("/style.css" if template == "/console" else "")
            resp = await http.request(method, path)
            assert resp.status_code == 200, (method, path, resp.status_code)

        # Callbacks: the API key is no substitute for their token; a wrong or missing one is 401.
        for _, template in TOKEN_PROTECTED:
            path = concrete(template)
            for params in ({}, {"token": WRONG_KEY}, {"token": TOKEN[:-1]}):
                resp = await http.post(
                    path, params=params, content=b"{}", headers={"x-api-key": API_KEY}
                )
                assert resp.status_code == 401, (template, params, resp.text)
                assert resp.json()["error"]["type"] == "authentication_error"


async def test_http_routes_never_take_the_key_from_the_url(
    secured: tuple[FastAPI, LoopbackServer],
) -> None:
    """`?key=` is for browsers' websockets only: on HTTP a key in the URL would end up in
    proxies' logs and browser history, so it is not accepted."""
    _, server = secured
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.get("/v1/models", params={"key": API_KEY})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "missing_api_key"


async def test_unknown_paths_do_not_reveal_themselves_without_a_key(
    secured: tuple[FastAPI, LoopbackServer],
) -> None:
    _, server = secured
    async with httpx.AsyncClient(base_url=server.url) as http:
        anon = await http.get("/api/nothing-here")
        known = await http.get("/api/nothing-here", headers={"x-api-key": API_KEY})
    assert anon.status_code == 401
    assert known.status_code == 404 and known.json()["error"]["code"] == "not_found"


async def test_callback_tokens_rotate_on_every_provider(
    secured: tuple[FastAPI, LoopbackServer],
) -> None:
    """`CVI_CALLBACK_TOKEN=new,old`: both tokens are accepted on every token-protected callback
    (Tavus, Argil by query and by path, JoggAI by query); the new one goes into new URLs."""
    app, server = secured
    tavus_event = {
        "conversation_id": "c-rotate",
        "event_type": "system.replica_joined",
        "message_type": "system",
        "timestamp": "2025-01-01T00:00:00Z",
        "properties": {"replica_id": "r1"},
    }
    argil_event = {"event": "VIDEO_GENERATION_START", "data": {"videoId": "v-rot"}}
    async with httpx.AsyncClient(base_url=server.url) as http:
        for token in (TOKEN, OLD_TOKEN):
            resp = await http.post("/callbacks/tavus", params={"token": token}, json=tavus_event)
            assert resp.status_code == 200, resp.text
            resp = await http.post("/callbacks/argil", params={"token": token}, json=argil_event)
            assert resp.status_code == 200, resp.text
            resp = await http.post(f"/callbacks/argil/{token}", json=argil_event)
            assert resp.status_code == 200, resp.text
            resp = await http.post(
                "/callbacks/jogg", params={"token": token}, json={"event": "ping"}
            )
            assert resp.status_code == 200, resp.text
        both = await http.post("/callbacks/argil", params={"token": f"{TOKEN},{OLD_TOKEN}"})
        assert both.status_code == 401  # the raw comma list is not itself a token
    videos = app.state.runtime.videos
    assert videos.callback_url("tavus").endswith(f"token={TOKEN}")
    assert videos.account_webhook_url("argil").endswith(f"token={TOKEN}")


# -- rate limiting -------------------------------------------------------------------------------


def test_token_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=10, burst=3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.1)  # empty: one token is 0.1 s away
    assert limiter.take("other") == 0.0  # buckets are per key
    now[0] += 0.05
    assert limiter.take("k") == pytest.approx(0.05)
    now[0] += 0.06
    assert limiter.take("k") == 0.0
    now[0] += 3600  # a long pause refills to the burst, not beyond
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") > 0


async def test_rate_limit_is_per_key_with_retry_after(serve: ServerFactory) -> None:
    second = "test-key-second-0123456789"
    server = serve(api_keys_raw=f"{API_KEY},{second}", rate_limit_rps=2, rate_limit_burst=5)
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=server.url) as http:
        codes = []
        for _ in range(8):
            resp = await http.post(
                "/v1/chat/completions", json=chat, headers={"x-api-key": API_KEY}
            )
            codes.append(resp.status_code)
        assert codes[:5] == [200] * 5 and 429 in codes[5:], codes
        limited = resp if resp.status_code == 429 else None
        assert limited is not None
        error = limited.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert set(error) == {"message", "type", "code", "param"}
        assert limited.headers["retry-after"] == "1"
        assert API_KEY not in limited.text
        # another key has its own bucket; the API and the live feed share a key's bucket
        other = await http.get("/api/conversations", headers={"x-api-key": second})
        assert other.status_code == 200
        api = await http.get("/api/conversations", headers={"x-api-key": API_KEY})
        assert api.status_code == 429
        ws_url = server.url.replace("http://", "ws://")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{ws_url}/api/conversations/x/live?key={API_KEY}"):
                pass
        assert refused.value.response.status_code == 429
        # public routes are never limited; a wrong key is refused, not counted
        assert (await http.get("/healthz")).status_code == 200
        await asyncio.sleep(1.1)  # two tokens back
        resp = await http.post("/v1/chat/completions", json=chat, headers={"x-api-key": API_KEY})
        assert resp.status_code == 200


async def test_default_rate_limit_never_throttles_speculative_traffic(
    serve: ServerFactory,
) -> None:
    """Tavus-like load on one key: 20 conversations each sending 5 progressive requests a
    second for 2 s (50 requests/s) stays under the default limit (100/s, bursts of 200)."""
    server = serve()
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=10) as http:

        async def conversation(n: int) -> list[int]:
            codes = []
            for i in range(10):
                body = {
                    "model": "echo",
                    "stream": True,
                    "messages": [{"role": "user", "content": "word " * (i + 1)}],
                }
                resp = await http.post(
                    "/v1/chat/completions",
                    json=body,
                    headers={"x-api-key": API_KEY, "conversation_id": f"c-{n}"},
                )
                codes.append(resp.status_code)
                await asyncio.sleep(0.2)
            return codes

        started = time.monotonic()
        results = await asyncio.gather(*(conversation(n) for n in range(20)))
    assert all(code == 200 for codes in results for code in codes), results
    assert time.monotonic() - started < 30


# -- CORS ----------------------------------------------------------------------------------------


async def test_cors_is_closed_by_default(serve: ServerFactory) -> None:
    server = serve()
    origin = {"Origin": "https://evil.example"}
    async with httpx.AsyncClient(base_url=server.url) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        simple = await http.get("/v1/models", headers={**origin, "x-api-key": API_KEY})
        public = await http.get("/healthz", headers=origin)
    assert preflight.status_code == 401
    for resp in (preflight, simple, public):
        assert not any(h.startswith("access-control-") for h in resp.headers), resp.headers
    assert simple.status_code == 200


async def test_cors_opens_only_for_the_listed_origins(serve: ServerFactory) -> None:
    allowed = "https://console.example"
    server = serve(cors_origins_raw=f"{allowed}, https://other.example/")
    async with httpx.AsyncClient(base_url=server.url) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
            },
        )
        other = await http.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        simple = await http.get("/v1/models", headers={"Origin": allowed, "x-api-key": API_KEY})
        refused = await http.get("/v1/models", headers={"Origin": allowed})
        trailing = await http.get(
            "/v1/models", headers={"Origin": "https://other.example", "x-api-key": API_KEY}
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == allowed
    # a refusal is readable by the allowed page (so it can show "invalid key")
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == allowed
    assert trailing.headers["access-control-allow-origin"] == "https://other.example"


# -- keys never logged ---------------------------------------------------------------------------


async def test_keys_and_tokens_never_reach_the_log(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    server = serve(callback_token=TOKEN)
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.post(
            "/v1/chat/completions",
            json={"model": "storyteller", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": API_KEY, "conversation_id": "c-log"},
        )
        await http.get("/v1/models", headers={"x-api-key": WRONG_KEY})
        await http.post("/callbacks/tavus", params={"token": WRONG_KEY}, json={})
        await http.post(
            "/callbacks/tavus",
            params={"token": TOKEN},
            json={"conversation_id": "c-log", "event_type": "system.replica_joined"},
        )
    # everything the server side logged (the test's own httpx client logs its URLs: left out)
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name.startswith("cvi_agent") for r in server_side)
    text = "\n".join(r.getMessage() for r in server_side)
    for secret in (API_KEY, WRONG_KEY, TOKEN, "sk-upstream-secret"):
        assert secret not in text


def test_settings_parse_cors_and_limits(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, cors_origins_raw=" https://a.example/ ,, https://b.example", rate_limit_rps=0
    )
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert make_settings(tmp_path).cors_origins == ()
    app = create_app(settings)
    assert not app.state.rate_limiter.enabled  # 0 turns the limit off
    defaults = make_settings(tmp_path)
    assert (defaults.rate_limit_rps, defaults.rate_limit_burst) == (100.0, 200)


async def test_unexpected_error_logs_the_route_template_not_the_secret_in_the_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash on a route whose path carries a secret (like `/callbacks/argil/{path_token}`)
    answers the OpenAI error shape and logs the route's template, never the concrete path."""
    app = create_app(make_settings(tmp_path, callback_token=TOKEN))

    @app.post("/callbacks/probe/{path_token}")
    async def crash(path_token: str) -> None:
        raise RuntimeError("boom")

    secret = "s3cret-path-token-0123456789"
    with LoopbackServer(app) as srv, caplog.at_level("ERROR"):
        async with httpx.AsyncClient(base_url=srv.url) as http:
            resp = await http.post(f"/callbacks/probe/{secret}", headers={"x-api-key": API_KEY})
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert "/callbacks/probe/{path_token}" in caplog.text
    assert secret not in caplog.text


async def test_the_icon_needs_no_key(serve: ServerFactory) -> None:
    """Fails before: every browser asked for /favicon.ico and logged the 401 it got."""
    server = serve(None)
    async with httpx.AsyncClient(base_url=server.url) as http:
        resp = await http.get("/favicon.ico")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/svg+xml"
    assert resp.content.startswith(b"<svg")
    text = (ROOT / "cvi_agent/web/console/index.html").read_text()
    assert '<link rel="icon" href="/favicon.ico"' in text
