"""The HTTP edges of `cvi-agent serve`, byte for byte on a raw socket: a refused websocket
handshake (one log line with its reason, no ERROR), an HTTP/1.1 request that offers
`Upgrade: h2c` (served as HTTP/1.1, body intact, connection reusable) and HTTP/1.0 requests
(no chunked framing: the body ends when the connection does)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvi_agent.app import create_app
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.web.edges import SERVER_PROTOCOLS, HTTPProtocol, needs_h11
from tests.procs import ServerProcess
from tests.support import API_KEY, make_settings

CHAT = json.dumps(
    {"model": "echo", "messages": [{"role": "user", "content": "hello edges"}]}
).encode()
STREAM = json.dumps(
    {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hello edges"}]}
).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `cvi-agent serve` process for the module (log level info, as in production)."""
    workdir = tmp_path_factory.mktemp("edges")
    proc = ServerProcess(workdir, f"sqlite+aiosqlite:///{workdir / 'cvi.db'}", name="edges")
    proc.start()
    yield proc
    proc.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One response with a Content-Length, leaving the connection open: (status line,
    headers with lower-case names, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the headers: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside the body"
        body += chunk
    return status.encode(), headers, body[:length]


def chat_request(version: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


H2C = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def wait_for_log(server: ServerProcess, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    return server.log_text()


# -- (a) a refused websocket -------------------------------------------------------------------


@pytest.mark.process
def test_refused_websocket_is_one_line_with_its_reason_and_no_error(server: ServerProcess) -> None:
    conversation = "no-such-conversation-" + os.urandom(4).hex()
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /api/conversations/{conversation}/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer wrong-key-for-edges\r\n\r\n"
    ).encode()
    with connect(server.port) as sock:
        sock.sendall(handshake)
        response = read_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), response
    assert json.loads(body)["error"]["code"] == "invalid_api_key"

    # With a good key but no such conversation: refused by the route itself (404).
    with connect(server.port) as sock:
        sock.sendall(handshake.replace(b"wrong-key-for-edges", API_KEY.encode()))
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 404 "), response

    log = wait_for_log(server, r"WEBSOCKET /api/conversations/\{conversation_id\}/live 404")
    time.sleep(0.3)  # anything logged after the refusal (an ERROR came right after it)
    log = server.log_text()
    lines = [line for line in log.splitlines() if "/live" in line]
    assert len(lines) == 2, lines  # one line per refusal: the request log's (web/access.py)
    # Refused before routing: the raw path (no query string); by the route: its template.
    assert f"WEBSOCKET /api/conversations/{conversation}/live 401 " in lines[0], lines
    assert "reason=invalid_api_key" in lines[0], lines
    assert "WEBSOCKET /api/conversations/{conversation_id}/live 404 " in lines[1], lines
    assert "reason=conversation_not_found" in lines[1], lines
    assert all(" INFO " in line or " WARNING " in line for line in lines), lines
    assert "ERROR" not in log and "without completing handshake" not in log, log[-3000:]
    assert "connection rejected" not in log and '"WebSocket ' not in log, log[-3000:]


# -- (b) Upgrade: h2c --------------------------------------------------------------------------


@pytest.mark.process
def test_h2c_upgrade_offer_is_served_as_http11_with_its_body(server: ServerProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(chat_request("1.1", CHAT, H2C))
        status, headers, body = read_response(sock)
        assert status == b"HTTP/1.1 200 OK", (status, body)
        assert "upgrade" not in headers  # the offer is declined: no 101, no h2
        assert json.loads(body)["choices"][0]["message"]["content"] == "hello edges"
        # The connection stays usable for the next request (curl reuses it).
        sock.sendall(chat_request("1.1", CHAT))
        status, _, body = read_response(sock)
        assert status == b"HTTP/1.1 200 OK", (status, body)
        assert json.loads(body)["choices"][0]["message"]["content"] == "hello edges"
    time.sleep(0.2)
    assert "WARNING" not in server.log_text(), server.log_text()[-3000:]  # a declined offer


# -- (c) HTTP/1.0 ------------------------------------------------------------------------------


@pytest.mark.process
def test_http10_streamed_response_is_delimited_by_close_not_chunked(
    server: ServerProcess,
) -> None:
    with connect(server.port) as sock:
        sock.sendall(chat_request("1.0", STREAM))
        response = read_until_closed(sock)  # the server closes: that ends the body
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    headers = head.lower().split(b"\r\n")
    assert not any(h.startswith(b"transfer-encoding") for h in headers), head
    assert not any(h.startswith(b"content-length") for h in headers), head
    assert b"connection: close" in headers, head
    assert body.startswith(b"data: {"), body[:200]  # raw events, no chunk-size lines
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    assert b"hello edges" in body


@pytest.mark.process
def test_http10_plain_response_keeps_its_length(server: ServerProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        response = read_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert int(re.search(rb"(?i)content-length: (\d+)", head).group(1)) == len(body)  # type: ignore[union-attr]
    assert json.loads(body)["status"] == "ok"


# -- which parser serves a connection ----------------------------------------------------------


def test_only_unusual_connections_leave_the_fast_parser(tmp_path: Path) -> None:
    """httptools keeps every ordinary connection (the hot path, websockets included); h11
    takes the ones whose first request is HTTP/1.0 or offers a non-websocket upgrade."""
    app = create_app(make_settings(tmp_path))
    with LoopbackServer(app, **SERVER_PROTOCOLS) as srv:
        state = srv.server.server_state

        def served_by(request: bytes) -> set[str]:
            with connect(srv.port) as sock:
                sock.sendall(request)
                read_response(sock)
                return {type(c).__name__ for c in state.connections}

        assert served_by(chat_request("1.1", CHAT)) == {HTTPProtocol.fast.__name__}
        assert served_by(chat_request("1.1", CHAT, H2C)) == {"QuietH11Protocol"}
        assert served_by(chat_request("1.1", CHAT, "Connection: keep-alive\r\n")) == {
            HTTPProtocol.fast.__name__
        }


@pytest.mark.parametrize(
    ("head", "h11"),
    [
        (b"GET / HTTP/1.1\r\nHost: x", False),
        (b"GET / HTTP/1.0\r\nHost: x", True),
        (b"POST / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c", True),
        (b"GET /live HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket", False),
        (b"POST / HTTP/1.1\r\nUpgrade: h2c", False),  # no `Connection: upgrade`: no upgrade
        (b"GET /upgrade-guide HTTP/1.1\r\nX-Upgrade: yes", False),
    ],
)
def test_which_heads_go_to_h11(head: bytes, h11: bool) -> None:
    assert needs_h11(head) is h11
