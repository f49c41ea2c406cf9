"""The credential-masking rules every log line and stored URL goes through: what they mask,
and what they leave alone."""

from __future__ import annotations

import pytest

from cvi_agent.protocol.callbacks import parse_tavus_callback
from cvi_agent.protocol.redact import redact_text, redact_url

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJyIjoicm9vbSJ9.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # query parameters, wherever the URL sits in a line
        (
            '127.0.0.1:5 - "WebSocket /api/conversations/c1/live?key=sk-abc123&after=4" [accepted]',
            '127.0.0.1:5 - "WebSocket /api/conversations/c1/live?key=***&after=4" [accepted]',
        ),
        (
            'HTTP Request: POST http://h/callbacks/tavus?token=tok-1 "HTTP/1.1 200 OK"',
            'HTTP Request: POST http://h/callbacks/tavus?token=*** "HTTP/1.1 200 OK"',
        ),
        ("https://x.daily.co/room?t=abc.def", "https://x.daily.co/room?t=***"),
        ("/v?a=1&signature=f00d&sig=beef&API_KEY=k", "/v?a=1&signature=***&sig=***&API_KEY=***"),
        ("/x?access_token=a;password=p", "/x?access_token=***;password=***"),
        # our callback paths with the token in the path
        ("POST /callbacks/argil/tok-2 HTTP/1.1", "POST /callbacks/argil/*** HTTP/1.1"),
        # a password in a URL
        (
            "cannot open postgresql+asyncpg://cvi:hunter22@db:5432/cvi",
            "cannot open postgresql+asyncpg://cvi:***@db:5432/cvi",
        ),
        ("redis://:pw-9@cache:6379/0", "redis://:***@cache:6379/0"),
        # header lines, as websockets logs them at debug
        ("< authorization: Bearer sk-live-1", "< authorization: ***"),
        ("< X-Api-Key: sk-live-2", "< X-Api-Key: ***"),
        ("< sec-websocket-protocol: cvi-agent, bearer.sk-live-3", "< sec-websocket-protocol: ***"),
        ("X-Webhook-Signature: 9f86d081884c", "X-Webhook-Signature: ***"),
        # dicts, JSON and header pairs
        (
            "{'authorization': 'Bearer x1', 'accept': '*/*'}",
            "{'authorization': '***', 'accept': '*/*'}",
        ),
        ('{"api_key": "k-1", "name": "n"}', '{"api_key": "***", "name": "n"}'),
        ("[(b'x-api-key', b'k-2'), (b'host', b'h')]", "[(b'x-api-key', b'***'), (b'host', b'h')]"),
        # bearer tokens and JWTs anywhere
        ("offered bearer.sk-live-4 and Bearer sk-live-5", "offered bearer.*** and Bearer ***"),
        (f"meeting token {JWT} given", "meeting token *** given"),
    ],
)
def test_credentials_are_masked(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact_text(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "persona storyteller: turn 3 took 120 ms",
        "dedupe_key=abc monkey=1 sort_key=2",
        "GET /api/conversations?after=12&limit=50",
        "/callbacks/tavus",
        "route /callbacks/argil/{path_token}",
        "http://127.0.0.1:8000/v1/chat/completions",
        "https://user@example.test/path",
        "the key was rotated",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_stored_urls_use_the_same_rules() -> None:
    assert redact_url("https://us.example/callbacks/tavus?token=abc&x=1") == (
        "https://us.example/callbacks/tavus?token=***&x=1"
    )
    assert redact_url(None) is None and redact_url(42) == 42
    stored = parse_tavus_callback(
        {
            "event_type": "system.replica_joined",
            "conversation_id": "c1",
            "webhook_url": "https://us.example/callbacks/tavus?token=t-123",
        }
    )
    assert stored.payload["webhook_url"] == "https://us.example/callbacks/tavus?token=***"
