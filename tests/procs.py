"""`python -m cvi_agent serve` as a subprocess, as in production: for tests that kill it, restart
it, or measure its memory apart from the test process's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cvi_agent.devtools.fakes.server import free_port
from tests.support import API_KEY, PERSONAS, child_environment

TOKEN = "callback-token-faults-0123456789"


class ServerProcess:
    """`python -m cvi_agent serve` on a free loopback port; `proc.pid` is the server itself
    (no shell in between), so SIGKILL hits the process that holds the database."""

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        name: str = "server",
        *,
        token: str = TOKEN,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.args = list(args or [])
        self.token = token
        self.extra_env = dict(env or {})
        self.workdir = workdir
        self.database_url = database_url
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = child_environment()
        env.update(
            CVI_API_KEYS=API_KEY,
            CVI_CALLBACK_TOKEN=self.token,
            CVI_DATABASE_URL=self.database_url,
            CVI_VAR_DIR=str(self.workdir / "var"),
            CVI_PERSONAS_DIR=str(PERSONAS),
            CVI_RATE_LIMIT_RPS="0",
            CVI_VIDEO_POLL_INTERVAL="0",
            CVI_UPSTREAM_BASE_URL="http://127.0.0.1:9/v1",
            PORT=str(self.port),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> ServerProcess:
        log_path = self.workdir / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cvi_agent", "serve", *self.args],
                cwd=self.workdir,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited at start:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} not up in 30 s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def rss(self) -> int:
        """The server process's resident set size, in bytes (Linux)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
