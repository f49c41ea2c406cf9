"""`cvi-agent serve` with no configuration at all, as `make run` starts it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cvi_agent.devtools.fakes.server import free_port
from tests.support import PERSONAS


@pytest.mark.process
def test_serve_with_zero_configuration(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CVI_", "TAVUS_")) and k not in ("HOST", "PORT")
    }
    env["PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvi_agent", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        key = None
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while key is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "development API key:" in line:
                key = line.rsplit(" ", 1)[1].strip()
        assert key and key.startswith("cvi-dev-")
        assert (tmp_path / "var" / "dev-api-key").read_text().strip() == key
        assert oct((tmp_path / "var" / "dev-api-key").stat().st_mode & 0o777) == "0o600"
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {
            "model": "interviewer",
            "stream": True,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        with httpx.stream(
            "POST",
            base + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert r.status_code == 200
            raw = "".join(r.iter_text())
        assert raw.rstrip().endswith("data: [DONE]")
        assert "What's your name?" not in raw  # split into chunks: words arrive separately
        assert '"role":"assistant"' in raw
        assert (tmp_path / "var" / "cvi-agent.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    # a restart reuses the same key
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cvi_agent.config import Settings, ensure_dev_key;"
            "s = Settings(); print(ensure_dev_key(s))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == key


@pytest.mark.process
def test_serve_workers_refuse_a_fixed_turn_port(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CVI_", "TAVUS_")) and k not in ("HOST", "PORT")
    }
    env.update(CVI_REDIS_URL="redis://127.0.0.1:9/0", CVI_TURNS_PORT="5555", PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "cvi_agent", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "CVI_TURNS_PORT" in done.stderr, "each worker needs a turn port of its own"
