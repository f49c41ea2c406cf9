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
