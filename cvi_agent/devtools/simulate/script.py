"""The YAML script a simulation plays: who speaks, what, and which interactions go through the API.

Scripts are data so that a scenario can be replayed or shared without writing Python; they are
validated up front so a typo fails with the file and field named, not halfway through a call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_SCRIPT = Path(__file__).parent / "simulation.yaml"


class Step(BaseModel):
    """One step of a script: exactly one of user / echo / respond / overwrite / append.

    A `user` step is spoken in the room and sent to the LLM as Tavus would; the others go
    through the server's interactions API, so a script exercises those paths too: `via`
    picks how the server delivers them (`rest`: Tavus's send-app-message, here the
    simulator's stand-in; `bot`: through the bot and the room; `auto`: the server's
    choice). On a `user` step, `via` is how its `interrupt_after_words` interrupt is sent.
    """

    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(default=None, min_length=1, max_length=2000)
    echo: str | None = Field(default=None, min_length=1, max_length=2000)
    respond: str | None = Field(default=None, min_length=1, max_length=2000)
    overwrite_context: str | None = Field(default=None, max_length=20_000)
    append_context: str | None = Field(default=None, min_length=1, max_length=20_000)
    interrupt_after_words: int | None = Field(default=None, ge=1, le=1000)
    via: Literal["auto", "rest", "bot"] | None = None
    pause: float = Field(default=0.0, ge=0, le=30)

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [self.user, self.echo, self.respond, self.overwrite_context, self.append_context]
        if sum(a is not None for a in actions) != 1:
            raise ValueError(
                "each step needs exactly one of user, echo, respond, overwrite_context, "
                "append_context"
            )
        if self.interrupt_after_words is not None and self.user is None:
            raise ValueError("interrupt_after_words goes with a user step")
        if self.via is not None and self.user is not None and self.interrupt_after_words is None:
            raise ValueError("via on a user step is for its interrupt_after_words")
        return self


class Script(BaseModel):
    """A whole scripted conversation, as read from YAML (unknown keys are refused).

    `persona` names the persona the server answers as; `user_name` is the simulated user's
    name in the room; `words_per_second` compresses speaking time so a run takes seconds;
    `partials` is how many requests a user turn sends (the last is final, the others
    speculative); `conversational_context` starts the system message, as Tavus's does.
    """

    model_config = ConfigDict(extra="forbid")
    persona: str = "concierge"
    user_name: str = "Maya"
    words_per_second: float = Field(default=12.0, gt=0, le=1000)
    partials: int = Field(default=3, ge=1, le=10)
    conversational_context: str = ""
    turns: list[Step] = Field(min_length=1, max_length=500)


def load_script(path: Path | None = None) -> Script:
    """Read and validate a script (default: the shipped one).

    Every failure is a `ValueError` naming the file and, for a bad field, its location, so the
    CLI can print one line instead of a traceback.
    """
    path = path or DEFAULT_SCRIPT
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Script.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the script: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {loc}: {first['msg']}") from exc
