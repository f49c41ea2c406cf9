"""Helpers for brains that produce text themselves: pacing, templating, cleaning user speech."""

from __future__ import annotations

import asyncio
import re
import string
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cvi_agent.llm.brains.base import TextDelta

_SPEECH_RE = re.compile(r"USER[_ ]SPEECH:\s*(.*?)(?:\s*VISUAL[_ ]SCENE:.*)?$", re.S | re.I)


def clean_user_text(text: str) -> str:
    """What the person said: drops Tavus's `USER_SPEECH: … VISUAL_SCENE: …` wrapper."""
    match = _SPEECH_RE.search(text)
    if match:
        text = match.group(1)
    return " ".join(text.split())


def normalize(text: str) -> str:
    """Case, whitespace and punctuation folded: for comparing what was said."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class _SafeFormatter(string.Formatter):
    """`str.format` that leaves unknown fields empty instead of raising."""

    def get_value(self, key: int | str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, str):
            return kwargs.get(key, "")
        return ""

    def get_field(self, field_name: str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, AttributeError, TypeError):
            return "", field_name


_formatter = _SafeFormatter()


def render(template: str, variables: Mapping[str, Any]) -> str:
    """`template.format(**variables)` that never raises: persona YAML is written by people, so
    an unknown field renders empty and a malformed template is spoken as written."""
    try:
        return _formatter.vformat(template, (), variables)
    except (ValueError, IndexError):
        return template


async def speak(text: str, words_per_chunk: int, delay_ms: float) -> AsyncIterator[TextDelta]:
    """Stream text in small chunks of words, like a model would, optionally paced.

    Unpaced, it still gives the event loop a turn between chunks, as a model's chunks arriving
    from the network do. Without it a whole reply was written in one step of the loop: a
    client that had just closed its stream was noticed only after it, and every write after
    the first failed one made asyncio print `socket.send() raised exception.` on stderr.
    """
    words = text.split(" ")
    delay = delay_ms / 1000.0
    for i in range(0, len(words), words_per_chunk):
        piece = " ".join(words[i : i + words_per_chunk])
        if i + words_per_chunk < len(words):
            piece += " "
        if i:
            await asyncio.sleep(delay)
        yield TextDelta(piece)
