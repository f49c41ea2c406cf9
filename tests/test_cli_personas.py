"""`cvi-agent personas push` against the fake Tavus."""

from __future__ import annotations

import pytest

from cvi_agent.cli.main import main
from cvi_agent.devtools.fakes.tavus import FakeTavus
from tests.support import API_KEY


@pytest.mark.usefixtures("tavus_cli_env")
def test_personas_push_creates_then_updates(
    fake_tavus: FakeTavus, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["personas", "push", "concierge", "--replica-id", "r9"]) == 0
    first = capsys.readouterr().out
    assert main(["personas", "push", "concierge"]) == 0
    second = capsys.readouterr().out
    [persona] = fake_tavus.personas.values()
    assert first.startswith(f"concierge: {persona['persona_id']} created")
    assert "updated" in second
    assert persona["layers"]["llm"]["base_url"] == "https://agent.example/v1"
    assert persona["layers"]["llm"]["api_key"] == API_KEY
    assert main(["personas", "push", "nope"]) == 2
