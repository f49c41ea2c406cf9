"""Serve an ASGI app with a real uvicorn on loopback, in a background thread with its own loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from cvi_agent.config import Settings
from cvi_agent.web.server import server_config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening(host: str) -> socket.socket:
    """A socket listening on a free port of `host`, as uvicorn's own: protocol TCP named, so
    asyncio turns Nagle's algorithm off on its connections (else a reply written in two parts
    waits for the client's delayed acknowledgement, ~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class LoopbackServer:
    """`with LoopbackServer(app) as srv: srv.url` — a real HTTP server for the block's duration."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int | None = None,
        settings: Settings | None = None,
        **config: Any,
    ) -> None:
        """
        Args:
            app: the ASGI app.
            host: the loopback address to bind.
            port: the port (default: a free one, bound here and held until the server serves on
                it, so no other process starting servers meanwhile can take it).
            settings: serve as `cvi-agent serve` does with these settings (our HTTP protocol,
                its deadlines and connection cap, `web/server.py`); default: plain uvicorn.
            config: further uvicorn `Config` arguments.
        """
        self.host = host
        self._socket: socket.socket | None = None
        if not port:
            self._socket = _listening(host)
            port = int(self._socket.getsockname()[1])
        self.port = port
        config.setdefault("log_level", "warning")
        config.setdefault("access_log", False)
        config.setdefault("lifespan", "on")
        config.setdefault("log_config", None)  # in-process: leave the host's logging alone
        if settings is None:
            cfg = uvicorn.Config(app, host=host, port=self.port, **config)
        else:
            cfg = server_config(app, settings, host=host, port=self.port, **config)
        self.server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        # Runner.close() cancels what is left (e.g. pending server tasks) cleanly.
        with asyncio.Runner() as runner:
            self.loop = runner.get_loop()
            runner.run(self.server.serve([self._socket] if self._socket is not None else None))

    def start(self, timeout: float = 10.0) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {self.url} did not start within {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._socket is not None:  # uvicorn closed it; or it never served
            self._socket.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
