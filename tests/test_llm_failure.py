"""`on_upstream_failure` (llm/failure.py): a caller that is not a live call gets OpenAI errors
(502/503/504, or an error event mid-stream) its SDK retries and its router falls back on; a
live Tavus call keeps hearing the fallback line. Either way `x-cvi-fallback` says so when the
headers had not gone out, and the turn's record says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan, ReplyStep
from cvi_agent.personas import PersonaError, load_persona
from tests.support import API_KEY, ServerFactory, eventually

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LINE = "Sorry, give me one second."
USER: Any = [{"role": "user", "content": "hello"}]


def personas_dir(tmp_path: Path, upstream_url: str) -> Path:
    """`auto` (no option), `speaks` and `errors`, all on the same upstream, budget 0.5 s."""
    d = tmp_path / "personas"
    d.mkdir(exist_ok=True)
    for name, option in (("auto", ""), ("speaks", "speak"), ("errors", "error")):
        (d / f"{name}.yaml").write_text(
            f"name: {name}\npersona_name: {name}\n"
            f"brain: {{kind: upstream, model: m, base_url: '{upstream_url}/v1', "
            f"first_token_timeout: 0.5}}\n"
            f'fallback_text: "{LINE}"\n' + (f"on_upstream_failure: {option}\n" if option else "")
        )
    return d


@pytest.fixture
def srv(serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path) -> LoopbackServer:
    url: str = upstream.url  # type: ignore[attr-defined]
    return serve(upstream, personas_dir=personas_dir(tmp_path, url), breaker_failures=100)


def sse(raw: str) -> list[str]:
    return [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]


async def post(srv: LoopbackServer, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        return await http.post("/v1/chat/completions", json=body, headers={**AUTH, **headers})


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json() == {
        "error": {
            "message": resp.json()["error"]["message"],
            "type": "server_error",
            "code": code,
            "param": None,
        }
    }
    assert resp.headers["x-cvi-fallback"] == code


# Failures before the first token, and what `error` answers each with.
FAILURES = [
    (Plan(status=500), 502, "upstream_error"),
    (Plan(status=429), 502, "upstream_error"),
    (Plan(ttft=2.0, steps=[ReplyStep(content="late")]), 504, "upstream_timeout"),
    (Plan(raw_chunks=[b"data: {not json\n\n"]), 502, "upstream_error"),
]


@pytest.mark.parametrize(("plan", "status", "code"), FAILURES)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_mode_answers_with_an_http_error(
    srv: LoopbackServer, upstream: FakeUpstream, plan: Plan, status: int, code: str, stream: bool
) -> None:
    """Fails before: 200, the fallback line, `finish_reason: stop`, zero usage."""
    upstream.push(plan)
    resp = await post(srv, {"model": "auto", "stream": stream, "messages": USER})
    assert_openai_error(resp, status, code)
    assert "x-request-id" in resp.headers


async def test_unreachable_upstream_is_a_503(serve: ServerFactory, tmp_path: Path) -> None:
    srv = serve(None, personas_dir=personas_dir(tmp_path, "http://127.0.0.1:9"))
    for stream in (False, True):
        resp = await post(srv, {"model": "auto", "stream": stream, "messages": USER})
        assert_openai_error(resp, 503, "upstream_unavailable")


async def test_sdk_retries_a_failed_turn(srv: LoopbackServer, upstream: FakeUpstream) -> None:
    """What the SDK does with a 5xx: retry. The second attempt reaches a healthy upstream."""
    upstream.push(Plan(status=500), upstream.reply("second time lucky"))
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=1) as c:
        completion = await c.chat.completions.create(model="auto", messages=USER)
        assert completion.choices[0].message.content == "second time lucky"
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        upstream.push(Plan(status=503))
        with pytest.raises(openai.InternalServerError) as caught:
            await c.chat.completions.create(model="auto", messages=USER, stream=True)
        assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert len(upstream.records) == 3


async def test_error_mid_stream_is_an_error_event_then_done(
    srv: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ") for i in range(10)], reset_after=3))
    resp = await post(srv, {"model": "errors", "stream": True, "messages": USER})
    assert resp.status_code == 200 and "x-cvi-fallback" not in resp.headers
    events = sse(resp.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {
        "error": {
            "message": "The persona's model broke off its answer; retry.",
            "type": "server_error",
            "code": "upstream_error",
            "param": None,
        }
    }
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]] == [
        "w0 ",
        "w1 ",
        "w2 ",
    ]
    # and the SDK raises it, after the text it had
    upstream.push(Plan(steps=[ReplyStep(content=f"w{i} ") for i in range(10)], reset_after=3))
    async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        stream = await c.chat.completions.create(model="errors", messages=USER, stream=True)
        seen: list[str] = []
        with pytest.raises(openai.APIError, match="broke off"):
            async with stream:
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
    assert seen == ["w0 ", "w1 ", "w2 "]


@pytest.mark.parametrize("stream", [False, True])
async def test_speak_mode_says_the_line_and_the_header_says_why(
    srv: LoopbackServer, upstream: FakeUpstream, stream: bool
) -> None:
    upstream.push(Plan(status=500))
    resp = await post(srv, {"model": "speaks", "stream": stream, "messages": USER})
    assert resp.status_code == 200 and resp.headers["x-cvi-fallback"] == "upstream_error"
    if stream:
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or "" for e in sse(resp.text)[:-1]
        )
        assert text == LINE and sse(resp.text)[-1] == "[DONE]"
    else:
        assert resp.json()["choices"][0]["message"]["content"] == LINE


async def test_a_good_answer_has_no_fallback_header(
    srv: LoopbackServer, upstream: FakeUpstream
) -> None:
    for stream in (False, True):
        resp = await post(srv, {"model": "errors", "stream": stream, "messages": USER})
        assert resp.status_code == 200 and "x-cvi-fallback" not in resp.headers


async def turn_records(srv: LoopbackServer, cid: str, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=srv.url) as http:

        async def recorded() -> list[dict[str, Any]] | None:
            resp = await http.get(f"/api/conversations/{cid}/events", headers=AUTH)
            turns = [e["payload"] for e in resp.json().get("data", []) if e["kind"] == "llm.turn"]
            return turns if len(turns) >= count else None

        turns: list[dict[str, Any]] = await eventually(recorded)
        return turns


async def test_a_live_call_speaks_and_its_record_says_so(
    srv: LoopbackServer, upstream: FakeUpstream
) -> None:
    """Fails before: the `llm.turn` record had no fallback field."""
    upstream.push(Plan(status=500))
    resp = await post(
        srv,
        {"model": "auto", "stream": True, "messages": USER},
        **{"x-conversation-id": "c-live-1", "x-request-id": "trace-live-1"},
    )
    assert resp.status_code == 200 and LINE in resp.text and resp.text.endswith("[DONE]\n\n")
    assert resp.headers["x-request-id"] == "trace-live-1"
    upstream.push(upstream.reply("all good"))
    await post(
        srv,
        {"model": "auto", "stream": True, "messages": [*USER, *USER]},
        **{"x-conversation-id": "c-live-1"},
    )
    turns = await turn_records(srv, "c-live-1", 2)
    failed = next(t for t in turns if t["fallback"])
    assert failed["fallback_reason"] == "upstream_error"
    assert failed["on_upstream_failure"] == "speak" and failed["fallback_mid_reply"] is False
    assert failed["request_id"] == "trace-live-1"
    good = next(t for t in turns if not t["fallback"])
    assert "fallback_reason" not in good


async def test_error_mode_in_a_conversation_is_an_error_event_and_recorded(
    srv: LoopbackServer, upstream: FakeUpstream
) -> None:
    """A persona that says `error` keeps saying it in a conversation; the response had started
    (turn tracking answers at once), so the body and the record carry it."""
    upstream.push(Plan(status=500))
    resp = await post(
        srv,
        {"model": "errors", "stream": True, "messages": USER},
        **{"x-conversation-id": "c-live-2"},
    )
    events = sse(resp.text)
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"
    assert LINE not in resp.text
    (turn,) = await turn_records(srv, "c-live-2", 1)
    assert turn["fallback"] is True and turn["on_upstream_failure"] == "error"


async def test_non_streamed_error_turn_is_recorded(
    srv: LoopbackServer, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(status=500))
    resp = await post(
        srv, {"model": "errors", "messages": USER}, **{"x-conversation-id": "c-live-3"}
    )
    assert_openai_error(resp, 502, "upstream_error")
    (turn,) = await turn_records(srv, "c-live-3", 1)
    assert turn["fallback_reason"] == "upstream_error" and turn["ttft_ms"] is None
    assert turn["error"].startswith("upstream 500"), turn


def test_on_upstream_failure_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: p\npersona_name: P\nbrain: {kind: echo}\non_upstream_failure: shout\n")
    with pytest.raises(PersonaError, match="on_upstream_failure"):
        load_persona(path)


# -- failures are data: the cause of a fallback, in the record, the metrics and the log ----------

LEAKY_401 = {
    "error": {
        "message": "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz1234. You can "
        "find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


async def test_a_fallback_turn_records_its_cause_without_the_key(
    srv: LoopbackServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Fails before: the record said `fallback` with a code, never what went wrong (and the
    log repeated the key fragment the upstream echoed)."""
    caplog.set_level("WARNING")
    upstream.push(Plan(status=401, error_body=LEAKY_401))
    cid = {"x-conversation-id": "c-cause-1"}
    resp = await post(srv, {"model": "auto", "stream": True, "messages": USER}, **cid)
    assert resp.status_code == 200 and LINE in resp.text
    upstream.push(upstream.reply("fine now"))
    await post(srv, {"model": "auto", "stream": True, "messages": [*USER, *USER]}, **cid)
    turns = await turn_records(srv, "c-cause-1", 2)
    failed = next(t for t in turns if t["fallback"])
    assert failed["error"].startswith("upstream 401: Incorrect API key provided"), failed
    assert "abcdefghijklmnop" not in failed["error"] and "\n" not in failed["error"]
    good = next(t for t in turns if not t["fallback"])
    assert good["fallback"] is False and good["error"] is None
    assert "401" in caplog.text and "abcdefghijklmnop" not in caplog.text


async def test_an_unreachable_upstream_is_named_in_the_record_metrics_and_log(
    serve: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fails before: after the breaker opened, the log said `circuit open` and nothing else;
    the record and the metrics had no cause."""
    srv = serve(None, personas_dir=personas_dir(tmp_path, "http://127.0.0.1:9"), breaker_failures=1)
    caplog.set_level("WARNING")
    for i in range(2):  # the first fails on the connection, the second on the open circuit
        resp = await post(
            srv,
            {"model": "speaks", "stream": True, "messages": USER * (i + 1)},
            **{"x-conversation-id": "c-cause-2"},
        )
        assert resp.status_code == 200 and LINE in resp.text
    turns = await turn_records(srv, "c-cause-2", 2)
    for turn in turns:
        assert turn["fallback"] is True
        assert "upstream unreachable" in turn["error"], turn["error"]
        assert "127.0.0.1:9" in turn["error"] and "refused" in turn["error"].lower()
    assert any("circuit open" in t["error"] for t in turns)
    opened = [r.getMessage() for r in caplog.records if "circuit open" in r.getMessage()]
    assert opened and all("refused" in line.lower() for line in opened), opened
    async with httpx.AsyncClient(base_url=srv.url) as http:
        text = (await http.get("/metrics", headers=AUTH)).text
    assert 'cvi_turn_fallbacks_total{persona="speaks",reason="upstream_unavailable"} 2.0' in text


async def test_a_refusal_without_any_key_says_which_setting_holds_it(
    serve: ServerFactory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The README's first minute: no `CVI_UPSTREAM_API_KEY`, so the upstream answers 401; the
    turn's cause names the setting (fails before: only `fallback_reason: upstream_error`)."""
    url: str = upstream.url  # type: ignore[attr-defined]
    srv = serve(upstream, personas_dir=personas_dir(tmp_path, url), upstream_api_key="")
    upstream.push(Plan(status=401, error_body=LEAKY_401))
    cid = {"x-conversation-id": "c-cause-3"}
    resp = await post(srv, {"model": "auto", "stream": True, "messages": USER}, **cid)
    assert resp.status_code == 200 and LINE in resp.text
    (turn,) = await turn_records(srv, "c-cause-3", 1)
    assert turn["error"].startswith("upstream 401: Incorrect API key provided: ***"), turn
    assert turn["error"].endswith(
        "(no API key is configured for this upstream: set CVI_UPSTREAM_API_KEY)"
    )
