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
            port: the port (default: a free one).
            settings: serve as `cvi-agent serve` does with these settings (our HTTP protocol,
                its deadlines and connection cap, `web/server.py`); default: plain uvicorn.
            config: further uvicorn `Config` arguments.
        """
        self.host = host
        self.port = port or free_port(host)
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
            runner.run(self.server.serve())

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

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
