"""Records the store keeps. Plain dataclasses: the store's public vocabulary, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

#: How deeply a stored JSON value's arrays and objects may nest, the value itself counted. Real
#: payloads stay under ten (a tool's JSON-schema parameters are the deepest); the record we
#: serve wraps a payload in a few more levels, and pydantic's serializer (every response)
#: refuses past about 250, so whatever is stored within it can always be read back. Request
#: bodies past it are refused (`web/body.py`); room messages are cut to it (`bot/recorder.py`).
MAX_JSON_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value`'s dicts and lists nest more than `limit` levels (the value counted).
    Iterative, so a value too deep for a recursive walk is still measured."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def now() -> float:
    """Wall-clock seconds, the one clock every stored timestamp uses (so rows written by
    different processes compare)."""
    return time.time()


@dataclass(slots=True)
class EventRecord:
    """One thing that happened in a conversation, from any source, kept raw.

    `dedupe_key` identifies a delivery: the same key from the same source is stored once.
    """

    conversation_id: str
    source: str  # room | callback | llm | api | bot | video
    kind: str  # event_type (or a descriptive name for our own events)
    dedupe_key: str
    payload: dict[str, Any]
    seq: int | None = None
    inference_id: str | None = None
    turn_idx: int | None = None
    role: str | None = None
    occurred_at: float | None = None
    received_at: float = field(default_factory=now)
    id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API and the live feed send (the `dedupe_key` stays internal)."""
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "source": self.source,
            "kind": self.kind,
            "seq": self.seq,
            "inference_id": self.inference_id,
            "turn_idx": self.turn_idx,
            "role": self.role,
            "occurred_at": self.occurred_at,
            "received_at": self.received_at,
            "payload": self.payload,
        }


@dataclass(slots=True)
class ConversationRecord:
    """What we know of one conversation as a whole: its persona, where it is in its life
    (`status`), why it ended, and `meta`, a JSON object callbacks add to (recording, perception
    analysis, replica id) without a column per kind of news."""

    id: str
    persona: str | None = None
    status: str = "active"
    conversation_url: str | None = None
    shutdown_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    ended_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API sends."""
        return {
            "id": self.id,
            "persona": self.persona,
            "status": self.status,
            "conversation_url": self.conversation_url,
            "shutdown_reason": self.shutdown_reason,
            "meta": self.meta,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
        }


@dataclass(slots=True)
class UtteranceRecord:
    """What one participant said in one turn.

    `intended_text` comes from `conversation.utterance` (for the replica: what the LLM meant
    to say); `spoken_text` from the final `conversation.utterance.streaming` (what was actually
    spoken, cut short when `is_interrupted`). Either may arrive first; each fills its own column.
    """

    conversation_id: str
    role: str  # user | replica
    key: str  # inference_id, or seq when there is none
    intended_text: str | None = None
    spoken_text: str | None = None
    is_interrupted: bool | None = None
    inference_id: str | None = None
    turn_idx: int | None = None
    seq: int | None = None
    occurred_at: float | None = None

    @property
    def text(self) -> str:
        """What was said: the spoken words when known (they are what the listener heard), else
        the intended ones."""
        return self.spoken_text if self.spoken_text is not None else (self.intended_text or "")

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API sends."""
        return {
            "role": self.role,
            "text": self.text,
            "intended_text": self.intended_text,
            "spoken_text": self.spoken_text,
            "is_interrupted": bool(self.is_interrupted),
            "inference_id": self.inference_id,
            "turn_idx": self.turn_idx,
            "seq": self.seq,
            "occurred_at": self.occurred_at,
        }


@dataclass(slots=True)
class ToolCallRecord:
    """One tool call the LLM made in a conversation, and once known, its outcome; `key` makes
    the call and its result, delivered separately, land on the same row."""

    conversation_id: str
    key: str  # tool_call_id, or inference_id:name:seq
    name: str
    arguments: str
    tool_call_id: str | None = None
    inference_id: str | None = None
    status: str = "called"  # called | success | error
    output: str | None = None
    occurred_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API sends."""
        return {
            "tool_call_id": self.tool_call_id,
            "name": self.name,
            "arguments": self.arguments,
            "inference_id": self.inference_id,
            "status": self.status,
            "output": self.output,
            "occurred_at": self.occurred_at,
        }


@dataclass(slots=True)
class VideoRecord:
    """An avatar video asked of a provider, as far as it got; `raw` keeps the provider's own
    fields, merged across status updates, for what our columns do not cover."""

    provider: str  # tavus | argil | jogg
    video_id: str
    status: str  # queued | rendering | ready | failed
    conversation_id: str | None = None
    url: str | None = None
    error: str | None = None
    script: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)

    def as_dict(self) -> dict[str, Any]:
        """The JSON the API, the CLI and room announcements send (`raw` stays internal)."""
        return {
            "provider": self.provider,
            "video_id": self.video_id,
            "status": self.status,
            "conversation_id": self.conversation_id,
            "url": self.url,
            "error": self.error,
            "script": self.script,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
