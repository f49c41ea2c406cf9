"""`cvi-agent conversations …` against our API (which talks to the fake Tavus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvi_agent.app import create_app
from cvi_agent.cli.main import main
from cvi_agent.devtools.fakes.server import LoopbackServer, free_port
from cvi_agent.devtools.fakes.tavus import FakeTavus
from tests.support import TAVUS_KEY, make_settings


@pytest.mark.usefixtures("tavus_cli_env")
def test_conversations_commands_use_our_api(
    fake_tavus: FakeTavus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    settings = make_settings(
        tmp_path,
        public_url=f"http://127.0.0.1:{port}",
        callback_token="cb-cli-0123456789",
        tavus_api_key=TAVUS_KEY,
        tavus_api_url=fake_tavus.url,
        run_worker=False,
    )
    url = f"http://127.0.0.1:{port}"
    with LoopbackServer(create_app(settings), port=port):
        assert main(["conversations", "--url", url, "create", "echo", "--no-bot"]) == 0
        created = json.loads(capsys.readouterr().out)
        cid = created["conversation"]["id"]
        assert main(["conversations", "--url", url, "list"]) == 0
        assert cid in capsys.readouterr().out
        assert main(["conversations", "--url", url, "get", cid]) == 0
        assert json.loads(capsys.readouterr().out)["conversation"]["id"] == cid
        # No bot: the interaction goes through Tavus's send-app-message API.
        assert main(["conversations", "--url", url, "interact", cid, '{"type": "interrupt"}']) == 0
        sent = json.loads(capsys.readouterr().out)
        assert sent["via"] == "rest" and sent["delivered"] is True
        assert fake_tavus.app_messages[cid] == [sent["message"]]
        interact_via_bot = ["interact", cid, '{"type": "interrupt"}', "--via", "bot"]
        assert main(["conversations", "--url", url, *interact_via_bot]) == 1
        assert "No bot is attached" in capsys.readouterr().err
        assert main(["conversations", "--url", url, "end", cid]) == 0
        assert json.loads(capsys.readouterr().out)["conversation"]["status"] == "ended"
        assert main(["conversations", "--url", url, "--key", "wrong", "list"]) == 1
        assert "HTTP 401" in capsys.readouterr().err
