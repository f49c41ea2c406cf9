"""The README, taken literally: its runnable shell blocks work pasted in order on a fresh clone.

Convention: a fenced block whose info string is `sh runnable` holds commands that work offline
(no Tavus, no model, no tunnel) and quickly. This test runs every such block, in the README's
order, in one `bash` with `set -e -o pipefail` (a failing command fails the test, naming its
block), in a temporary copy of the repository whose `.venv` is this checkout's. Each test gets
its own copy, so `var/` (the SQLite database, the dev key) starts empty. The ports the README
uses (8000 for `serve`, 8765 for `room serve`, 8766 for `videos fake-server`) are replaced by
free ones, and `PORT` is set to the first, so parallel test runs and a developer's own server
do not collide. Whatever the blocks leave running in the background is stopped at the end.
Plain `sh` blocks (Tavus, tunnels, benchmarks) are documentation only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cvi_agent.devtools.fakes.server import free_port
from tests.support import ROOT, child_environment

README = ROOT / "README.md"
BLOCK = re.compile(r"^```sh runnable[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PORTS = (8000, 8765, 8766)  # serve, room serve, videos fake-server
BUDGET = 90.0  # seconds for every block together
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "var",
    "node_modules",
    "test-artifacts",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
)


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """The `sh runnable` blocks of a README: (line of the opening fence, commands)."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def script_of(blocks: list[tuple[int, str]], ports: dict[int, int]) -> str:
    """One bash script: the blocks in order, each announced on stderr, ports substituted."""
    lines = ["set -e -o pipefail"]
    for line, body in blocks:
        for port, free in ports.items():
            body = re.sub(rf"\b{port}\b", str(free), body)
        lines.append(f"echo '### README.md:{line}' >&2")
        lines.append(body.rstrip("\n"))
    lines.append("echo '### all blocks done' >&2")
    return "\n".join(lines) + "\n"


def fresh_clone(tmp_path: Path) -> Path:
    """The repository as a fresh clone sees it (no var/, no caches), with this `.venv`."""
    clone = tmp_path / "cvi-agent"
    shutil.copytree(ROOT, clone, ignore=COPY_IGNORE, symlinks=True)
    venv = ROOT / ".venv"
    assert (venv / "bin" / "cvi-agent").exists(), f"no {venv}: run `make install` first"
    (clone / ".venv").symlink_to(venv)
    return clone


def clean_env(tmp_path: Path, port: int) -> dict[str, str]:
    """The environment of a new terminal: none of the project's variables, a private HOME."""
    env = child_environment()
    env.update(PORT=str(port), HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def stop_group(proc: subprocess.Popen[str]) -> None:
    """Stop the script's whole process group: every server a block left in the background."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def run_blocks(tmp_path: Path, blocks: list[tuple[int, str]]) -> tuple[int, str]:
    """Run the blocks as `bash` would, pasted: (exit status, everything printed)."""
    clone = fresh_clone(tmp_path)
    ports = {port: free_port() for port in PORTS}
    script = tmp_path / "readme.sh"
    script.write_text(script_of(blocks, ports))
    log = tmp_path / "readme.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(script)],
            cwd=clone,
            env=clean_env(tmp_path, ports[8000]),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=BUDGET)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            stop_group(proc)
    return code, log.read_text(errors="replace")


def failed_block(output: str) -> str:
    started = re.findall(r"^### (README\.md:\d+)$", output, re.MULTILINE)
    return started[-1] if started else "before the first block"


def test_the_readme_marks_its_offline_commands_runnable() -> None:
    blocks = runnable_blocks(README.read_text())
    text = "\n".join(body for _, body in blocks)
    assert len(blocks) >= 5
    for command in ("cvi-agent serve &", "simulate", "room serve", "videos fake-server", "bot"):
        assert command in text, command
    assert "kill %" not in text  # job numbers differ between shells: blocks kill by $!


@pytest.mark.process
@pytest.mark.slow
def test_every_runnable_block_works_pasted_in_order(tmp_path: Path) -> None:
    started = time.monotonic()
    code, output = run_blocks(tmp_path, runnable_blocks(README.read_text()))
    took = time.monotonic() - started
    where = failed_block(output)
    assert code != -1, f"still running after {BUDGET:.0f} s, in {where}:\n{output[-4000:]}"
    assert code == 0, f"exit {code} in {where}:\n{output[-4000:]}"
    assert "### all blocks done" in output
    assert "Traceback" not in output, output[-4000:]
    assert took < BUDGET
    clone = tmp_path / "cvi-agent"
    assert (clone / "var" / "cvi-agent.db").is_file()  # one database, in var/
    assert '"status": "ready"' in output  # the video the fake providers made


@pytest.mark.process
def test_a_failing_command_fails_the_run(tmp_path: Path) -> None:
    """The harness itself: a broken command stops the script and names its block."""
    blocks = [
        (10, ".venv/bin/cvi-agent personas list"),
        (20, ".venv/bin/cvi-agent personas validate --no-such-option"),
        (30, "echo never"),
    ]
    code, output = run_blocks(tmp_path, blocks)
    assert code not in (0, -1)
    assert failed_block(output) == "README.md:20"
    assert "never" not in output.split("### README.md:20", 1)[1]


@pytest.mark.process
def test_a_server_left_in_the_background_is_stopped(tmp_path: Path) -> None:
    blocks = [(1, "sleep 300 & echo $! > sleeper.pid")]
    code, _ = run_blocks(tmp_path, blocks)
    assert code == 0
    pid = int((tmp_path / "cvi-agent" / "sleeper.pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
