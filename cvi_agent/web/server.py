"""The uvicorn configuration `cvi-agent serve` runs with, in one place, so that the tests start
the real server exactly as production does (same protocol, deadlines, cap and logging)."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from cvi_agent.config import Settings
from cvi_agent.web.connections import ConnectionLimits, limits_of
from cvi_agent.web.edges import SERVER_PROTOCOLS
from cvi_agent.web.logs import log_config

#: The app factory `--workers` processes import (each builds its own app from the environment).
APP_FACTORY = "cvi_agent.app:create_app"


class ServerConfig(uvicorn.Config):
    """uvicorn's `Config` plus our `ConnectionLimits`, which `GuardedHttpToolsProtocol` reads
    from it."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.connection_limits = limits


def uvicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """uvicorn `Config` arguments: ours (our HTTP and websocket protocols, `web/edges.py`; the
    redacting log configuration, `web/logs.py`, which `--workers` processes apply again; no
    access log; the settings' host, port and log level), then `overrides`."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config(settings.log_level, settings.log_format),
        "access_log": False,
        **SERVER_PROTOCOLS,
    }
    options.update(overrides)
    return options


def server_config(app: Any, settings: Settings, **overrides: Any) -> ServerConfig:
    """The config for serving `app` in this process (`overrides` as in `uvicorn_options`)."""
    return ServerConfig(app, limits=limits_of(settings), **uvicorn_options(settings, **overrides))


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The server's listening socket, bound and listening before anything else starts (so a
    busy port is known before the banner, and connections wait in the backlog while the app
    starts). Raises `OSError` (`EADDRINUSE` for a busy port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio: Nagle off
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)  # `--workers` processes accept on it too
    return sock


def serve(
    app: Any,
    settings: Settings,
    workers: int = 1,
    sock: socket.socket | None = None,
    **overrides: Any,
) -> bool:
    """Serve until stopped; False when the server did not start. `sock`: a socket from
    `listen` (default: uvicorn binds host and port itself). With `workers` > 1, uvicorn
    starts that many processes, each importing `APP_FACTORY` and reading its settings (and
    connection limits, `env_limits`) from the environment; `app` is not used then."""
    if workers > 1:
        options = uvicorn_options(settings, **overrides)
        if sock is None:
            uvicorn.run(APP_FACTORY, factory=True, workers=workers, **options)
            return True
        config = ServerConfig(
            APP_FACTORY, limits=limits_of(settings), factory=True, workers=workers, **options
        )
        Multiprocess(config, sockets=[sock]).run()
        return True
    server = uvicorn.Server(server_config(app, settings, **overrides))
    server.run(sockets=[sock] if sock is not None else None)
    return server.started
