"""Scripts: a bad one is refused with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvi_agent.devtools.simulate.script import load_script


@pytest.mark.parametrize("text", ["persona: x\nturns: []\n", "turns: [{user: hi, echo: ho}]\n"])
def test_bad_scripts_are_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"s\.yaml: turns"):
        load_script(path)


def test_via_names_a_delivery_path(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "turns: [{echo: hi, via: rest}, {user: hey, interrupt_after_words: 1, via: bot}]"
    )
    steps = load_script(path).turns
    assert [s.via for s in steps] == ["rest", "bot"]
    path.write_text("turns: [{echo: hi, via: pigeon}]")
    with pytest.raises(ValueError, match=r"turns\.0\.via"):
        load_script(path)
    path.write_text("turns: [{user: hi, via: rest}]")  # no interrupt to send
    with pytest.raises(ValueError, match="interrupt_after_words"):
        load_script(path)
    shipped = load_script()
    assert {s.via for s in shipped.turns if s.via} == {"rest", "bot"}
