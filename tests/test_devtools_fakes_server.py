"""`LoopbackServer`: a real uvicorn on loopback, on a port nobody else can take meanwhile."""

from __future__ import annotations

import socket
import statistics
import time

import httpx
import pytest
from fastapi import FastAPI

from cvi_agent.devtools.fakes.server import LoopbackServer


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    return app


def test_its_port_is_held_from_construction_until_it_serves() -> None:
    """Fails before: the port was found free, released, and bound only once the server's thread
    ran; another process starting servers at the same moment (`cvi-agent simulate` runs in
    parallel) could take it meanwhile, and the run failed with `error while attempting to bind
    on address … address already in use` on stderr."""
    server = LoopbackServer(_app())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", server.port))
    with server, httpx.Client(base_url=server.url, timeout=5) as client:
        assert client.get("/ping").json() == {"pong": True}
        # As on a port uvicorn binds itself, no answer waits for the client's delayed
        # acknowledgement (Nagle's algorithm is off): about 40 ms each, else.
        took = []
        for _ in range(9):
            started = time.perf_counter()
            client.get("/ping")
            took.append(time.perf_counter() - started)
        assert statistics.median(took) < 0.025, took
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", server.port))  # released once stopped
