"""The server as `cvi-agent serve` configures it (web/server.py, web/connections.py): deadlines
for a request's headers and body, the connection cap, and the same configuration in `serve`
as in these tests. Raw sockets on loopback, so the bytes on the wire are what we assert."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.upstream import FakeUpstream, FakeUpstreamConfig
from cvi_agent.web.connections import GuardedHttpToolsProtocol, ResponseTransport
from cvi_agent.web.server import listen
from tests.procs import ServerProcess
from tests.support import API_KEY, ServerFactory

FAST = {"header_timeout": 1.0, "body_timeout": 1.0}


def connect(server: LoopbackServer | ServerProcess) -> socket.socket:
    port = server.port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was."""
    start = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def slow_client_count(server: LoopbackServer | ServerProcess, phase: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", headers={"x-api-key": API_KEY}).text
    for line in text.splitlines():
        if line.startswith(f'cvi_slow_clients_closed_total{{phase="{phase}"}}'):
            return float(line.split()[-1])
    return 0.0


def trickle(sock: socket.socket, data: bytes, interval: float) -> threading.Thread:
    """Send `data` a byte every `interval` seconds in the background, until refused."""

    def run() -> None:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_headers_sent_a_byte_at_a_time_are_cut_off(serve: ServerFactory) -> None:
    server = serve(**FAST)
    before = slow_client_count(server, "headers")
    sock = connect(server)
    # 0.1 s a byte: 10 s for a request line and headers that never end.
    sender = trickle(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, 0.1)
    data, elapsed = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b'"code":"request_timeout"' in data.replace(b" ", b"")
    assert 0.9 < elapsed < 3.0, elapsed
    assert slow_client_count(server, "headers") == before + 1
    sock.close()
    sender.join(15)


def test_a_connection_that_sends_nothing_is_closed(serve: ServerFactory) -> None:
    server = serve(**FAST)
    sock = connect(server)
    data, elapsed = read_until_closed(sock)
    assert data == b"" and 0.9 < elapsed < 3.0, (data, elapsed)


def test_a_declared_body_that_never_comes_is_a_408(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(**FAST)
    before = slow_client_count(server, "body")
    sock = connect(server)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"x-api-key: " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    sock.sendall(head + b'{"model": "echo"')
    data, elapsed = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert 0.9 < elapsed < 3.0, elapsed
    assert slow_client_count(server, "body") == before + 1
    # The route waiting for the body ended quietly: no traceback, no "unhandled error".
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # And the server serves on.
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_request_that_arrives_whole_leaves_no_timer(serve: ServerFactory) -> None:
    """The hot path: the one timer a connection gets at its start is gone once a request
    arrived whole, and a keep-alive request that arrives whole arms none."""
    server = serve()
    with httpx.Client(base_url=server.url, headers={"x-api-key": API_KEY}) as http:
        for _ in range(3):
            assert http.get("/v1/models").status_code == 200
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        protocols = [
            p
            for p in server.server.server_state.connections
            if isinstance(p, GuardedHttpToolsProtocol)
        ]
        assert len(protocols) == 1
        assert protocols[0]._timer is None


def test_connections_beyond_the_cap_get_a_clean_503(serve: ServerFactory) -> None:
    server = serve(max_connections=2)
    clients = [httpx.Client(base_url=server.url, headers={"x-api-key": API_KEY}) for _ in range(3)]
    try:
        assert clients[0].get("/healthz").status_code == 200
        assert clients[1].get("/healthz").status_code == 200  # two keep-alive connections open
        refused = clients[2].get("/v1/models")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "too_many_connections"
        clients[0].close()
        deadline = time.monotonic() + 5
        while len(server.server.server_state.connections) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert clients[2].get("/v1/models").status_code == 200
        metrics = clients[1].get("/metrics").text
        assert 'cvi_connections_refused_total{reason="too_many_connections"} 1.0' in metrics
    finally:
        for client in clients:
            client.close()


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_with_the_same_configuration(tmp_path: Path, workers: int) -> None:
    """`cvi-agent serve` (one process, or `--workers 2`, which read the limits from the
    environment) cuts off a slow header sender as the in-process server does."""
    server = ServerProcess(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}",
        env={"CVI_HEADER_TIMEOUT": "1", "CVI_RUN_WORKER": "false"},
        args=["--workers", str(workers)],
    )
    server.start()
    try:
        for _ in range(3):
            sock = connect(server)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            data, elapsed = read_until_closed(sock)
            sock.close()
            # uvicorn's supervisor may replace a worker still starting on a busy machine (its
            # health check); a connection it held is reset, with nothing sent: try again.
            if data or workers == 1:
                break
        assert data.startswith(b"HTTP/1.1 408 "), (data, server.log_text()[-2000:])
        assert 0.9 < elapsed < 3.0, elapsed
    finally:
        server.stop()


def test_replies_to_clients_that_left_leave_the_log_quiet(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A fast upstream's reply pushed to a stream whose client just reset it: asyncio counted
    every write after the failed one and logged `socket.send() raised exception.` from the
    fifth on, dozens of times for a few abandoned speculative requests."""
    upstream = FakeUpstream(FakeUpstreamConfig(reply_words=300))
    with LoopbackServer(upstream) as up:
        upstream.url = up.url  # type: ignore[attr-defined]
        server = serve(upstream)
        caplog.set_level(logging.WARNING, logger="asyncio")
        for turn in range(60):
            body = json.dumps(
                {"model": "storyteller", "stream": True,
                 "messages": [{"role": "user", "content": f"Tell me story {turn}"}]}
            ).encode()  # fmt: skip
            sock = connect(server)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nconversation_id: gone-{turn}\r\n".encode()
                + f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert sock.recv(200).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, as a client that drops a stream mid-reply sends
        with httpx.Client(base_url=server.url) as http:  # the server is still fine
            assert http.get("/healthz").status_code == 200
        time.sleep(0.3)
    ours = f"uvicorn-{server.port}"  # the server's thread (the fake upstream's writes are not ours)
    noise = [
        r.getMessage()
        for r in caplog.records
        if "socket.send" in r.getMessage() and r.threadName == ours
    ]
    assert noise == []


class _Wire:
    """A transport that records each write (one write is one system call and one segment)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info {name}"


async def test_a_response_head_goes_out_with_the_body_of_the_same_turn() -> None:
    loop = asyncio.get_running_loop()
    wire = _Wire()
    answer = ResponseTransport(wire, loop)  # type: ignore[arg-type]
    answer.write(b"HEAD ")
    answer.write(b"body")
    await asyncio.sleep(0)
    answer.write(b" more")
    assert wire.writes == [b"HEAD body", b" more"]
    assert answer.get_extra_info("peername") == "info peername"  # the rest is the transport's

    wire = _Wire()
    alone = ResponseTransport(wire, loop)  # type: ignore[arg-type]
    alone.write(b"HEAD")
    assert wire.writes == []
    await asyncio.sleep(0)  # the end of the turn: never held longer
    assert wire.writes == [b"HEAD"]
    alone.write(b"later")
    assert wire.writes == [b"HEAD", b"later"]

    wire = _Wire()
    closing = ResponseTransport(wire, loop)  # type: ignore[arg-type]
    closing.write(b"HEAD")
    closing.close()
    assert wire.writes == [b"HEAD"] and wire.closed
    closing.write(b"after the client left")  # dropped quietly, not asyncio's to count and log
    assert wire.writes == [b"HEAD"]


def test_a_stream_that_starts_at_once_sends_its_head_before_the_first_token(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """A turn's stream starts at once: its head is not held until the first chunk (1 s on)."""
    upstream.config.ttft = 1.0
    server = serve(upstream)
    body = json.dumps(
        {"model": "storyteller", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nx-conversation-id: c-head\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sent = time.monotonic()
        sock.sendall(head + body)
        sock.settimeout(5)
        first = sock.recv(65536)
        took = time.monotonic() - sent
        rest, _ = read_until_closed_or_done(sock)
    assert first.startswith(b"HTTP/1.1 200 ") and b"data:" not in first
    assert took < 0.8
    assert (first + rest).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def read_until_closed_or_done(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until the chunked body's last chunk (or the connection closes)."""
    start = time.monotonic()
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


async def test_connections_accepted_on_the_listening_socket_have_nagle_off() -> None:
    """`serve` binds first (`listen`); asyncio turns Nagle off on accepted connections only when
    the listening socket is a TCP one by its protocol number, else small writes (a stream's last
    chunk and its terminator) can wait for a delayed ACK, ~40 ms."""
    sock = listen("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
