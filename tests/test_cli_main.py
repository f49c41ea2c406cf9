"""`cvi-agent serve` with no configuration at all, as `make run` starts it; what it says when
it cannot start; `--version` and the help texts."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvi_agent import __version__
from cvi_agent.cli.main import build_parser, main
from cvi_agent.devtools.fakes.server import free_port
from tests.support import PERSONAS, child_environment


@pytest.mark.process
def test_serve_with_zero_configuration(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    port = free_port()
    env = child_environment()
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


def _serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`cvi-agent serve` that must exit by itself (it could not start)."""
    return subprocess.run(
        [sys.executable, "-m", "cvi_agent", "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.process
def test_a_busy_port_is_one_line_and_exit_2_before_any_banner(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve(tmp_path, child_environment(PORT=str(port)))
    assert done.returncode == 2
    assert done.stdout == ""  # no "serving on", no key printed
    assert done.stderr.splitlines() == [
        f"cvi-agent: cannot listen on 127.0.0.1:{port}: Address already in use (another "
        "server is using it? stop it, or choose another port with --port or PORT)"
    ]


@pytest.mark.process
def test_an_unreachable_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    url = f"postgresql+asyncpg://cvi:pw-secret-123@127.0.0.1:{free_port()}/cvi"
    done = _serve(tmp_path, child_environment(PORT="0", CVI_DATABASE_URL=url))
    assert done.returncode == 2
    assert "serving on" not in done.stdout and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("cvi-agent: cannot start: database: cannot connect to ")
    assert (
        "pw-secret-123" not in line and "fix: start the database, or set CVI_DATABASE_URL" in line
    )


@pytest.mark.process
def test_the_banner_comes_after_the_bind_and_says_where_things_are(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvi_agent", "serve"],
        cwd=tmp_path,
        env=child_environment(
            PORT=str(port), CVI_UPSTREAM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            banner.append(line)
            if "serving on" in line:
                break
        with socket.socket() as probe:  # the port is ours already (connections wait)
            assert probe.connect_ex(("127.0.0.1", port)) == 0
        text = "".join(banner)
        base = f"http://127.0.0.1:{port}"
        assert f"console: {base}/" in text and f"readiness: {base}/readyz" in text
        assert f"the API key is kept in {Path('var') / 'dev-api-key'}" in text
        assert f"generated token kept in {Path('var') / 'callback-token'}" in text
        assert "development callback token in var" not in text
        warnings = [line for line in banner if line.startswith("cvi-agent: warning: upstream")]
        assert len(warnings) == 2 and all("CVI_UPSTREAM_API_KEY" in w for w in warnings)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"cvi-agent {__version__}"


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_is_documented_with_its_default() -> None:
    """Each command's `--help`: every option has a help text, and the text shows the default
    wherever there is one (None, False and empty lists are "not given")."""
    problems = []
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        helped = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = " ".join((*path, *(action.option_strings or [action.dest])))
            if not action.help:
                problems.append(f"{name}: no help")
                continue
            text = formatter._expand_help(action)
            assert " ".join(text.split())[:30] in " ".join(helped.split()), name
            default = action.default
            if default is None or default is False or default == [] or default is argparse.SUPPRESS:
                continue
            if str(default) not in text and "default" not in text.lower():
                problems.append(f"{name}: default {default!r} not in {text!r}")
    assert problems == []


@pytest.mark.process
def test_serve_workers_refuse_a_fixed_turn_port(tmp_path: Path) -> None:
    shutil.copytree(PERSONAS, tmp_path / "personas")
    env = child_environment(
        CVI_REDIS_URL="redis://127.0.0.1:9/0", CVI_TURNS_PORT="5555", PORT=str(free_port())
    )
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
    assert "serving on" not in done.stdout


@pytest.mark.process
def test_serve_workers_keep_the_metrics_of_another_running_server(tmp_path: Path) -> None:
    """Two `serve --workers` sharing a var dir: each counts its own workers; only the
    directories of servers no longer running are cleared."""
    shutil.copytree(PERSONAS, tmp_path / "personas")
    root = tmp_path / "var" / "prometheus"
    alive = root / str(os.getpid())  # this test's process stands for the other server
    dead = root / "999999999"
    for path in (alive, dead):
        path.mkdir(parents=True)
        (path / "counter_1.db").write_bytes(b"x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvi_agent", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=child_environment(PORT=str(free_port())),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "serving on" not in proc.stdout.readline():
            pass
        own = root / str(proc.pid)
        while time.monotonic() < deadline and not own.is_dir():  # made just after the banner
            time.sleep(0.05)
        assert own.is_dir()
        assert (alive / "counter_1.db").exists(), "a running server's metrics are kept"
        assert not dead.exists(), "a stopped server's metrics are cleared"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
