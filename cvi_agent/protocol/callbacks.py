"""Tavus webhook payloads (TAVUS_PROTOCOL §4): classify a delivery and compute its identity.

Pure functions, no I/O. Tolerant in: any JSON object is accepted and classified; what we do not
recognise is kept as kind `unknown` (or its own `event_type`). The dedupe key identifies one
delivery, so the same callback posted twice is stored once whatever order deliveries arrive in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from cvi_agent.protocol.redact import redact_url
from cvi_agent.protocol.timestamps import parse_timestamp as parse_timestamp  # re-exported

MAX_ID_LENGTH = 128

Category = Literal["conversation", "video", "replica", "unknown"]

# `shutdown_reason` values as documented; matched by prefix because the docs' own examples
# disagree on the trailing " reached" ("participant_left_timeout" vs "... reached").
SHUTDOWN_REASONS: tuple[tuple[str, str], ...] = (
    ("max_call_duration", "max_call_duration"),
    ("participant_left_timeout", "participant_left_timeout"),
    ("participant_absent_timeout", "participant_absent_timeout"),
    ("end_conversation_endpoint_hit", "end_conversation_endpoint_hit"),
    ("daily_room_has_been_deleted", "daily_room_has_been_deleted"),
    ("internal error", "internal_error"),
    ("internal_error", "internal_error"),
)


class CallbackError(ValueError):
    """A payload we cannot store (an identifier that is not usable as one)."""


@dataclass(slots=True, frozen=True)
class TavusCallback:
    category: Category
    kind: str
    conversation_id: str  # "" for video/replica callbacks, which name no conversation
    dedupe_key: str
    occurred_at: float | None
    properties: dict[str, Any]
    payload: dict[str, Any]  # the delivery as stored (secrets redacted)
    subject_id: str | None = None  # video_id / replica_id
    status: str | None = None


def stable_hash(value: Any) -> str:
    """A hash that does not depend on key order or whitespace (128 bits, hex)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def shutdown_code(reason: Any) -> str:
    """The documented shutdown reason a free-text `shutdown_reason` starts with, or `other`."""
    text = " ".join(str(reason or "").lower().split())
    for prefix, code in SHUTDOWN_REASONS:
        if text.startswith(prefix) or text.replace(" ", "_").startswith(prefix):
            return code
    return "other"


def _identifier(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise CallbackError(f"{field} must be a string")
    text = str(value).strip()
    if len(text) > MAX_ID_LENGTH:
        raise CallbackError(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if text and not re.fullmatch(r"[\x21-\x7e]+", text):
        raise CallbackError(f"{field} must be printable ASCII without spaces")
    return text


def _short(value: Any, limit: int) -> str:
    return str(value if value is not None else "")[:limit]


def parse_tavus_callback(raw: dict[str, Any]) -> TavusCallback:
    """Classify one webhook delivery. Raises `CallbackError` only for unusable identifiers."""
    payload = dict(raw)
    if "webhook_url" in payload:
        payload["webhook_url"] = redact_url(payload["webhook_url"])
    event_type = raw.get("event_type")
    properties = raw.get("properties")
    props: dict[str, Any] = properties if isinstance(properties, dict) else {}

    if isinstance(event_type, str) and event_type.strip():
        kind = event_type.strip()[:128]
        conversation_id = _identifier(raw.get("conversation_id"), "conversation_id")
        timestamp = raw.get("timestamp")
        key = "|".join(
            (
                conversation_id,
                kind[:100],
                _short(timestamp, 64),
                stable_hash(properties if properties is not None else None),
            )
        )
        return TavusCallback(
            category="conversation",
            kind=kind,
            conversation_id=conversation_id,
            dedupe_key=key,
            occurred_at=parse_timestamp(timestamp),
            properties=props,
            payload=payload,
        )

    status = raw.get("status")
    if raw.get("video_id") is not None and status is not None:
        video_id = _identifier(raw.get("video_id"), "video_id")
        status_text = _short(status, 64)
        return TavusCallback(
            category="video",
            kind=f"video.{status_text}",
            conversation_id=_identifier(raw.get("conversation_id"), "conversation_id"),
            dedupe_key=f"video|{video_id}|{status_text}",
            occurred_at=parse_timestamp(raw.get("updated_at")),
            properties={},
            payload=payload,
            subject_id=video_id,
            status=status_text,
        )
    if raw.get("replica_id") is not None and status is not None:
        replica_id = _identifier(raw.get("replica_id"), "replica_id")
        status_text = _short(status, 64)
        return TavusCallback(
            category="replica",
            kind=f"replica.{status_text}",
            conversation_id="",
            dedupe_key=f"replica|{replica_id}|{status_text}",
            occurred_at=parse_timestamp(raw.get("updated_at")),
            properties={},
            payload=payload,
            subject_id=replica_id,
            status=status_text,
        )
    raw_id = raw.get("conversation_id")
    return TavusCallback(
        category="unknown",
        kind="unknown",
        conversation_id=_identifier(raw_id, "conversation_id")
        if isinstance(raw_id, str | int)
        else "",
        dedupe_key="unknown|" + stable_hash(payload),
        occurred_at=parse_timestamp(raw.get("timestamp")),
        properties=props,
        payload=payload,
    )
