"""`cvi-agent doctor`: one line per check, and an exit status a script can trust."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvi_agent.cli.main import main
from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.devtools.fakes.upstream import FakeUpstream
from tests.support import PERSONAS, child_environment


@pytest.mark.process
def test_a_fresh_clone_without_an_upstream_key_fails_and_says_what_to_set(
    tmp_path: Path,
) -> None:
    """As a new user runs it: no configuration at all, no upstream reachable (a closed port
    stands for "no internet", so the result does not depend on this machine's network)."""
    shutil.copytree(PERSONAS, tmp_path / "personas")
    env = child_environment()
    env["CVI_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{free_port()}/v1"
    done = subprocess.run(
        [sys.executable, "-m", "cvi_agent", "doctor", "--timeout", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == [
        "FAIL upstream storyteller",
        "FAIL upstream weather",
    ]
    assert all("CVI_UPSTREAM_API_KEY is not set" in line for line in failed)
    assert all("fix: " in line and "set CVI_UPSTREAM_API_KEY" in line for line in failed)
    assert any(line.startswith("OK   database:") for line in lines)
    assert lines[-1] == "doctor: 2 failed, 0 warning(s), 6 OK"
    assert not (tmp_path / "var").exists()  # checking creates nothing


def test_all_configured_and_answering_exits_0(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    upstream: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CVI_PERSONAS_DIR", str(PERSONAS))
    monkeypatch.setenv("CVI_UPSTREAM_BASE_URL", upstream.url + "/v1")  # type: ignore[attr-defined]
    monkeypatch.setenv("CVI_UPSTREAM_API_KEY", "sk-upstream-secret")
    monkeypatch.setenv("CVI_API_KEYS", "test-key-0123456789")
    monkeypatch.setenv("CVI_CALLBACK_TOKEN", "callback-token-0123456789")
    monkeypatch.setenv("CVI_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}")
    assert main(["doctor", "--timeout", "2"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "WARN" not in out
    assert "OK   upstream storyteller: gpt-4o-mini at " in out
    assert "sk-upstream-secret" not in out and "callback-token-0123456789" not in out
    assert len(upstream.records) == 2  # storyteller and weather, one tiny request each
