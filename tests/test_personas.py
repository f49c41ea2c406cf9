"""Persona loading and validation: errors name the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvi_agent.config import Settings
from cvi_agent.personas import PersonaError, load_personas, tavus_persona_payload
from cvi_agent.runtime import load_checked_personas
from tests.support import PERSONAS, ROOT


def write(dir_: Path, name: str, text: str) -> Path:
    dir_.mkdir(exist_ok=True)
    path = dir_ / name
    path.write_text(text)
    return path


def test_shipped_personas_are_valid() -> None:
    personas = load_checked_personas(Settings(personas_dir=PERSONAS))
    assert {"storyteller", "weather", "interviewer", "echo", "concierge"} <= set(personas)
    kinds = {p.brain.kind for p in personas.values()}
    assert kinds == {"upstream", "flow", "echo"}
    assert any(t.execution == "server" for t in personas["weather"].tools)
    assert any(t.execution == "client" for t in personas["weather"].tools)
    assert personas["interviewer"].flow is not None and personas["interviewer"].flow.questionnaire


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "name: x\npersona_name: X\nbrain: {kind: upstream}\n",
            "brain: Value error, brain.model is required",
        ),
        ("name: x\nbrain: {kind: echo}\n", "persona_name: Field required"),
        (
            "name: 'bad name!'\npersona_name: X\nbrain: {kind: echo}\n",
            "name: String should match pattern",
        ),
        ("name: x\npersona_name: X\nbrain: {kind: telepathy}\n", "brain.kind: Input should be"),
        (
            "name: x\npersona_name: X\nbrain: {kind: echo}\nsurprise: 1\n",
            "surprise: Extra inputs are not permitted",
        ),
        ("name: x\npersona_name: X\nbrain: {kind: flow}\n", "needs a 'flow' section"),
        (
            "name: x\npersona_name: X\nbrain: {kind: flow}\nflow: {intents: [{name: a, patterns: ['(']}]}\n",
            "flow.intents.0.patterns: Value error, invalid regular expression",
        ),
        (
            "name: x\npersona_name: X\nbrain: {kind: echo}\ntools: [{function: {name: 'a b'}}]\n",
            "tools.0.function.name",
        ),
        ("name: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "p", "broken.yaml", text)
    with pytest.raises(PersonaError) as exc:
        load_personas(tmp_path / "p")
    assert str(path) in str(exc.value)
    assert fragment in str(exc.value)


def test_duplicate_names_and_unknown_server_handler(tmp_path: Path) -> None:
    d = tmp_path / "p"
    write(d, "a.yaml", "name: same\npersona_name: A\nbrain: {kind: echo}\n")
    write(d, "b.yaml", "name: same\npersona_name: B\nbrain: {kind: echo}\n")
    with pytest.raises(PersonaError, match="already used by"):
        load_personas(d)
    d2 = tmp_path / "q"
    write(
        d2,
        "t.yaml",
        "name: t\npersona_name: T\nbrain: {kind: echo}\n"
        "tools: [{execution: server, handler: no_such_tool, function: {name: f}}]\n",
    )
    with pytest.raises(
        PersonaError, match=r"t\.yaml: tools\.f: .*no built-in handler named 'no_such_tool'"
    ):
        load_checked_personas(Settings(personas_dir=d2))


def test_tavus_payload_points_llm_layer_here() -> None:
    personas = load_personas(PERSONAS)
    payload = tavus_persona_payload(personas["weather"], "https://agent.example/", "k-123", "r1")
    llm = payload["layers"]["llm"]
    assert llm["base_url"] == "https://agent.example/v1"
    assert llm["model"] == "weather" and llm["api_key"] == "k-123"
    assert llm["speculative_inference"] is True
    assert [t["function"]["name"] for t in llm["tools"]] == ["get_current_weather"]
    assert payload["persona_name"] == "Wendy the Weather Assistant"
    assert payload["default_replica_id"] == "r1"


@pytest.mark.process
def test_cli_personas_list_and_validate(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cvi_agent", "personas", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "interviewer" in out.stdout and "get_current_time(server)" in out.stdout
    write(tmp_path / "bad", "x.yaml", "name: x\n")
    out = subprocess.run(
        [sys.executable, "-m", "cvi_agent", "personas", "validate", "--dir", str(tmp_path / "bad")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "x.yaml: persona_name: Field required" in out.stderr
    assert "Traceback" not in out.stderr
