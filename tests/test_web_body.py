"""Total input handling at our own edge (web/body.py, the callback timestamps, the cursors): every
body, timestamp and cursor a client can send is a 4xx or is stored so that it reads back, never
a 500, and the keep-alive connection it came on keeps serving."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.protocol.callbacks import parse_timestamp
from cvi_agent.protocol.events import InvalidEvent, parse_event
from cvi_agent.store.base import MAX_JSON_DEPTH
from cvi_agent.videos.base import parse_time
from cvi_agent.web.body import parse_json_object
from cvi_agent.web.errors import ApiError
from tests.support import API_KEY, ServerFactory

TOKEN = "cb-token-edges-0123456789"
AUTH = {"x-api-key": API_KEY, "content-type": "application/json"}
HUGE_INT = "1" * 5000  # past Python's int-string conversion limit (4300 digits)


BAD_CURSORS = [
    '[1.0, "\\ud800"]',  # an escaped lone surrogate: JSON, but no database can bind it
    '[1e400, "x"]',
    '[NaN, "x"]',
    '[true, "x"]',
    "[" + HUGE_INT + ', "x"]',
]


def nested(depth: int) -> dict[str, Any]:
    """A JSON object `depth` levels deep, the object itself counted."""
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# -- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"x": ' + HUGE_INT.encode() + b"}",  # ValueError from int(), not a JSONDecodeError
        b'{"x": -' + HUGE_INT.encode() + b"}",
        b'{"x": 1e400}',
        b'{"x": NaN}',
        b'{"x": "\\ud800"}',
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in the C scanner
        json.dumps(nested(MAX_JSON_DEPTH + 1)).encode(),
        b'{"x": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
        b"\xff\xfe{}",
        b"",
        b"[]",
    ],
    ids=[
        "huge-int",
        "huge-negative-int",
        "huge-float",
        "nan",
        "escaped-surrogate",
        "deep-array",
        "one-level-too-deep",
        "utf8-surrogate",
        "not-utf8",
        "empty",
        "not-an-object",
    ],
)
def test_every_parser_error_is_a_400(body: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json_object(body)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_json"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    value = nested(MAX_JSON_DEPTH)
    assert parse_json_object(json.dumps(value).encode()) == value
    wide = {"m": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * 5000}
    assert parse_json_object(json.dumps(wide).encode()) == wide


# -- timestamps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), 1e300, -1e300, "1e400", "-1e400", "nan", "inf", -1],
    ids=lambda v: repr(v)[:12],
)
def test_out_of_range_timestamps_are_dropped_not_raised(value: Any) -> None:
    """Stored without a time rather than refused: Tavus would redeliver a refused callback
    forever, and the raw value stays in the stored payload."""
    assert parse_timestamp(value) is None
    assert parse_time(value) is None
    event = parse_event(
        {
            "event_type": "conversation.utterance",
            "timestamp": value,
            "properties": {"role": "user", "speech": "hi"},
        }
    )
    assert not isinstance(event, InvalidEvent) and event.timestamp is None


def test_timestamps_in_range_still_parse() -> None:
    assert parse_timestamp("9999-12-31T23:59:59Z") == pytest.approx(253402300799.0)
    assert parse_timestamp(0) == 0.0
    assert parse_time("2025-01-01T00:00:00Z") == pytest.approx(1735689600.0)


# -- over a real server, on one keep-alive connection ------------------------------------------


class OneConnection:
    """Requests over exactly one TCP connection; fails if the server closes it."""

    def __init__(self, server: LoopbackServer) -> None:
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        self.conn.connect()
        assert self.conn.sock is not None
        self.local = self.conn.sock.getsockname()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] = AUTH
    ) -> tuple[int, dict[str, Any]]:
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.getheader("connection") != "close", (method, path, resp.status, data[:300])
        assert self.conn.sock is not None and self.conn.sock.getsockname() == self.local
        return resp.status, json.loads(data) if data else {}

    def close(self) -> None:
        self.conn.close()


def callback(body: dict[str, Any] | bytes) -> tuple[str, str, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return "POST", f"/callbacks/tavus?token={TOKEN}", raw


async def test_hostile_inputs_are_4xx_and_the_connection_keeps_serving(
    serve: ServerFactory, database_url: str
) -> None:
    server = serve(database_url=database_url, callback_token=TOKEN, run_worker=False)
    cid = "c-edges-1"
    one = OneConnection(server)

    def ok() -> None:  # the next request on the same connection still works
        status, body = one.request("GET", "/v1/models")
        assert status == 200 and body["object"] == "list"

    try:
        status, _ = one.request(
            *callback({"event_type": "application.whatever", "conversation_id": cid})
        )
        assert status == 200
        chat_prefix = b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "x": '
        refused: list[tuple[str, str, bytes | None, str | None]] = [
            (
                "POST",
                "/v1/chat/completions",
                chat_prefix + HUGE_INT.encode() + b"}",
                "invalid_json",
            ),
            (
                *callback(
                    b'{"event_type": "x", "conversation_id": "c", "n": ' + HUGE_INT.encode() + b"}"
                ),
                "invalid_json",
            ),
            (
                *callback(
                    {"event_type": "deep", "conversation_id": cid, **nested(MAX_JSON_DEPTH + 1)}
                ),
                "invalid_json",
            ),
            ("GET", f"/api/conversations/{cid}/events?after=-1", None, "invalid_after"),
            ("GET", f"/api/conversations/{cid}/events?after=-{'9' * 30}", None, "invalid_after"),
            ("GET", f"/api/conversations/{cid}/events?after={'9' * 30}", None, "invalid_after"),
            ("GET", f"/api/conversations/{cid}/events?after={HUGE_INT}", None, None),
            *(
                ("GET", f"/api/conversations?cursor={cursor_of(raw)}", None, "invalid_cursor")
                for raw in BAD_CURSORS
            ),
        ]
        for method, path, body, code in refused:
            status, answer = one.request(method, path, body)
            assert status == 400, (path[:80], status, answer)
            if code is not None:
                assert answer["error"]["code"] == code, (path[:80], answer)
            ok()

        # The deepest body we accept (the object plus its own "properties" level) reads back.
        deepest = {
            "event_type": "deep",
            "conversation_id": cid,
            "properties": nested(MAX_JSON_DEPTH - 1),
        }
        status, answer = one.request(*callback(deepest))
        assert status == 200, answer
        for ts, kind in ((10**400, "ts.int"), ("1e400", "ts.string"), (1e300, "ts.float")):
            status, answer = one.request(
                *callback({"event_type": kind, "conversation_id": cid, "timestamp": ts})
            )
            assert status == 200, answer
        status, answer = one.request(
            *callback({"video_id": "v-edges", "status": "ready", "updated_at": 10**400})
        )
        assert status in (200, 400), answer

        status, record = one.request("GET", f"/api/conversations/{cid}")
        assert status == 200, record
        status, events = one.request("GET", f"/api/conversations/{cid}/events")
        assert status == 200, events
        by_kind = {e["kind"]: e for e in events["data"]}
        assert by_kind["deep"]["payload"]["properties"] == deepest["properties"]
        for kind in ("ts.int", "ts.string", "ts.float"):
            assert by_kind[kind]["occurred_at"] is None
        assert by_kind["ts.string"]["payload"]["timestamp"] == "1e400"  # kept as sent
        status, _ = one.request("GET", "/api/conversations")
        assert status == 200
    finally:
        one.close()


async def test_live_feed_refuses_an_out_of_range_after(serve: ServerFactory) -> None:
    server = serve(callback_token=TOKEN, run_worker=False)
    one = OneConnection(server)
    try:
        status, _ = one.request(*callback({"event_type": "x", "conversation_id": "c-ws"}))
        assert status == 200
    finally:
        one.close()
    base = server.url.replace("http://", "ws://") + "/api/conversations/c-ws/live"
    for after in ("-1", "-" + "9" * 30, "9" * 30, HUGE_INT):
        with pytest.raises(InvalidStatus) as caught:
            async with connect(
                f"{base}?after={after}",
                additional_headers={"x-api-key": API_KEY},
                open_timeout=10,
            ):
                pass
        assert caught.value.response.status_code == 400, after
    async with connect(
        f"{base}?after=0", additional_headers={"x-api-key": API_KEY}, open_timeout=10
    ) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] in ("event", "live")
