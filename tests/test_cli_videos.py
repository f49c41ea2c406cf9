"""`cvi-agent videos …` against the fake providers, with a real SQLite store."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvi_agent.cli.main import build_parser, main
from cvi_agent.devtools.fakes.videos import FakeVideoProviders, env
from tests.videos_support import fake_providers, fake_url


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeVideoProviders]:
    with fake_providers(stage_seconds=0.05) as f:
        for name, value in env(fake_url(f)).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("CVI_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
        monkeypatch.setenv("CVI_VAR_DIR", str(tmp_path / "var"))
        monkeypatch.setenv("CVI_PUBLIC_URL", "https://agent.example.test")
        monkeypatch.delenv("CVI_CALLBACK_TOKEN", raising=False)
        monkeypatch.delenv("JOGG_WEBHOOK_SECRET", raising=False)
        yield f


def test_create_wait_get_and_list(
    fake: FakeVideoProviders, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "videos", "create", "--provider", "argil", "--script", "Hi Maya. Here is your recap.",
            "--conversation-id", "conv-cli", "--title", "Recap", "--wait", "5",
        ]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads(out.out)
    assert record["status"] == "ready" and record["conversation_id"] == "conv-cli"
    assert record["url"].endswith(".mp4")
    assert "using avatar" in out.err and "using voice" in out.err
    [body] = fake.creates["argil"]
    assert body["name"] == "Recap" and body["extras"] == {"conversation_id": "conv-cli"}

    assert main(["videos", "get", record["video_id"], "--provider", "argil"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ready"

    assert (
        main(["videos", "create", "--provider", "jogg", "--script", "Hi.", "--avatar", "127"]) == 0
    )
    jogg = json.loads(capsys.readouterr().out)
    assert jogg["status"] == "queued"

    assert main(["videos", "list", "--json", "--conversation-id", "conv-cli"]) == 0
    assert [v["video_id"] for v in json.loads(capsys.readouterr().out)] == [record["video_id"]]
    assert main(["videos", "list", "--provider", "jogg"]) == 0
    table = capsys.readouterr().out
    assert jogg["video_id"] in table and record["video_id"] not in table


def test_errors_are_short_and_exit_non_zero(
    fake: FakeVideoProviders, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["videos", "get", "video_missing", "--provider", "jogg"]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["videos", "create", "--provider", "tavus"]) == 2
    monkeypatch.setenv("TAVUS_API_KEY", "")
    assert main(["videos", "avatars", "--provider", "tavus"]) == 1
    assert "set TAVUS_API_KEY" in capsys.readouterr().err


def test_avatars_and_voices(fake: FakeVideoProviders, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["videos", "avatars", "--provider", "jogg"]) == 0
    assert capsys.readouterr().out == "127\tAva\n"
    assert main(["videos", "voices", "--provider", "argil"]) == 0
    assert "Warm" in capsys.readouterr().out


def test_register_webhooks(
    fake: FakeVideoProviders,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    assert main(["videos", "webhooks", "register", "--provider", "argil"]) == 1
    assert "CVI_CALLBACK_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("CVI_CALLBACK_TOKEN", "tok-0123456789")
    assert main(["videos", "webhooks", "register", "--provider", "argil"]) == 0
    assert main(["videos", "webhooks", "register", "--provider", "argil"]) == 0
    out = capsys.readouterr().out
    assert "created" in out and "updated" in out and "tok-0123456789" not in out
    [hook] = fake.argil_webhooks.values()
    assert hook["callbackUrl"] == "https://agent.example.test/callbacks/argil?token=tok-0123456789"

    assert main(["videos", "webhooks", "register", "--provider", "jogg"]) == 0
    out = capsys.readouterr().out
    [endpoint] = fake.jogg_endpoints.values()
    assert endpoint["url"] == "https://agent.example.test/callbacks/jogg"
    secret_file = tmp_path / "var" / "jogg-webhook-secret"
    assert secret_file.read_text().strip() == endpoint["secret"]
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert endpoint["secret"] not in out and str(secret_file) in out
    # Again: the endpoint is updated in place, the stored secret stays valid.
    assert main(["videos", "webhooks", "register", "--provider", "jogg"]) == 0
    assert "updated" in capsys.readouterr().out
    assert list(fake.jogg_endpoints.values()) == [endpoint]
    assert secret_file.read_text().strip() == endpoint["secret"]
    assert main(["videos", "webhooks", "list", "--provider", "jogg"]) == 0
    assert endpoint["secret"] not in capsys.readouterr().out


def test_wait_on_a_failed_video_exits_non_zero(
    fake: FakeVideoProviders, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["videos", "create", "--provider", "tavus", "--script", "FAIL please", "--wait", "5"]
    )
    out = capsys.readouterr()
    assert code == 1, out.err
    assert json.loads(out.out)["status"] == "failed"  # the record is still printed
    assert "failed" in out.err.splitlines()[-1]


def test_wait_that_times_out_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_providers(stage_seconds=30) as slow:
        for name, value in env(fake_url(slow)).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("CVI_VAR_DIR", str(tmp_path / "var"))
        code = main(["videos", "create", "--provider", "argil", "--script", "Hi.", "--wait", "0.5"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert json.loads(out.out)["status"] in ("queued", "rendering")
    assert "still" in out.err.splitlines()[-1] and "0.5" in out.err.splitlines()[-1]
    assert (tmp_path / "var" / "cvi-agent.db").is_file()  # CVI_VAR_DIR holds the store


def test_without_wait_a_queued_video_exits_zero(
    fake: FakeVideoProviders, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["videos", "create", "--provider", "tavus", "--script", "FAIL later"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "queued"


def test_fake_server_default_port_differs_from_the_room_server() -> None:
    parser = build_parser()
    videos = parser.parse_args(["videos", "fake-server"])
    rooms = parser.parse_args(["room", "serve"])
    assert (videos.port, rooms.port) == (8766, 8765)  # both README sections can run at once


@pytest.mark.process
def test_fake_server_on_a_taken_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "cvi_agent", "videos", "fake-server", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"cvi-agent videos fake-server: cannot listen on 127.0.0.1:{port}: address already "
        "in use (another server is there; pick another with --port)"
    ]
    assert "export" not in proc.stdout  # nothing promised before the port was ours
