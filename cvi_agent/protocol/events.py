"""Events the room sends us (TAVUS_PROTOCOL §3): tolerant in, nothing lost.

`parse_event()` accepts what daily-python or a websocket hands over (a dict, a JSON string or
bytes) and never raises: a known event type becomes its model, an unknown one an
`UnknownEvent` that keeps the message whole, and anything unusable an `InvalidEvent` that says
why (and still carries the raw input, so it can be recorded). Every known spelling is accepted:
`speech`/`text`, `replica`/`pal`, hyphenated event names, `"true"` booleans, numeric strings.
Pure: no I/O, no globals beyond the lookup table.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cvi_agent.protocol.timestamps import parse_timestamp

# -- lenient scalars -----------------------------------------------------------------------------


def _to_int(value: Any) -> int | None:
    """Ints, integral floats and numeric strings; anything else is unknown (None), not an error."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if math.isfinite(number) and number.is_integer() else None
    return None


def _to_float(value: Any) -> float | None:
    """Numbers, numeric strings and ISO-8601 strings (as Unix seconds)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            return None
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
        return number if math.isfinite(number) else None
    return None


_TRUE = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "off", "f", ""})


def _to_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def _to_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


_ROLES = {"replica": "replica", "pal": "replica", "assistant": "replica", "user": "user"}


def normalize_role(value: Any) -> str | None:
    """`user` | `replica` (Tavus also says `pal`); other roles are kept lower-cased."""
    text = _to_str(value)
    if text is None:
        return None
    text = text.strip().lower()
    return _ROLES.get(text, text) or None


def normalize_event_type(value: str) -> str:
    """`conversation.perception-analysis` → `conversation.perception_analysis`."""
    return value.strip().replace("-", "_")


LooseInt = Annotated[int | None, BeforeValidator(_to_int)]
LooseFloat = Annotated[float | None, BeforeValidator(_to_float)]
# Unix seconds between 1970 and 9999, else None (never a time no reader can handle).
LooseTimestamp = Annotated[float | None, BeforeValidator(parse_timestamp)]
LooseBool = Annotated[bool | None, BeforeValidator(_to_bool)]
LooseStr = Annotated[str | None, BeforeValidator(_to_str)]
Role = Annotated[str | None, BeforeValidator(normalize_role)]
Speech = Annotated[str, BeforeValidator(lambda v: _to_str(v) or "")]


def _json_string(value: Any) -> Any:
    """Tool arguments travel as a JSON string; an object sent by mistake is encoded."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return value


# -- properties ------------------------------------------------------------------------------------


class _Props(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class UtteranceProperties(_Props):
    role: Role
    speech: Speech = Field(validation_alias=AliasChoices("speech", "text"))
    visual_context: Any = None
    user_audio_analysis: Any = None
    user_visual_analysis: Any = None


class UtteranceStreamingProperties(_Props):
    role: Role
    speech: Speech = Field(default="", validation_alias=AliasChoices("speech", "text"))
    content_index: LooseInt = None
    final: LooseBool = False
    is_interrupted: LooseBool = False


class SpeakingProperties(_Props):
    role: Role = None
    interrupted: LooseBool = None
    duration: LooseFloat = None


class ToolCallProperties(_Props):
    name: str = Field(min_length=1)
    arguments: Annotated[str, BeforeValidator(_json_string)] = ""
    tool_call_id: LooseStr = None


class PerceptionToolCallProperties(_Props):
    name: str = Field(min_length=1)
    modality: LooseStr = None
    arguments: Any = None
    frames: list[Any] | None = None


class PerceptionAnalysisProperties(_Props):
    analysis: Any = None


# -- events ----------------------------------------------------------------------------------------


class RoomEvent(BaseModel):
    """Common envelope. `raw` is the message exactly as received (before any normalization)."""

    model_config = ConfigDict(extra="ignore")

    EVENT_TYPES: ClassVar[tuple[str, ...]] = ()

    event_type: str
    message_type: LooseStr = None
    conversation_id: LooseStr = None
    inference_id: LooseStr = None
    seq: LooseInt = None
    turn_idx: LooseInt = None
    timestamp: LooseTimestamp = None
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)

    @property
    def role(self) -> str | None:
        return None


class Utterance(RoomEvent):
    """What a participant said; for the replica the *intended* text."""

    EVENT_TYPES = ("conversation.utterance",)
    properties: UtteranceProperties

    @property
    def role(self) -> str | None:
        return self.properties.role

    @property
    def speech(self) -> str:
        return self.properties.speech


class UtteranceStreaming(RoomEvent):
    """What was *actually* spoken so far (accumulated); the final one ends the utterance."""

    EVENT_TYPES = ("conversation.utterance.streaming",)
    properties: UtteranceStreamingProperties

    @property
    def role(self) -> str | None:
        return self.properties.role

    @property
    def speech(self) -> str:
        return self.properties.speech

    @property
    def final(self) -> bool:
        return bool(self.properties.final)

    @property
    def is_interrupted(self) -> bool:
        return bool(self.properties.is_interrupted)


_SPEAKING = {
    "conversation.started_speaking": (True, None, False),
    "conversation.stopped_speaking": (False, None, False),
    "conversation.replica.started_speaking": (True, "replica", True),
    "conversation.replica.stopped_speaking": (False, "replica", True),
    "conversation.user.started_speaking": (True, "user", True),
    "conversation.user.stopped_speaking": (False, "user", True),
}


class SpeakingEvent(RoomEvent):
    """Started/stopped speaking. `legacy` marks the per-role twins (count only one family)."""

    EVENT_TYPES = tuple(_SPEAKING)
    properties: SpeakingProperties = Field(default_factory=SpeakingProperties)

    @property
    def started(self) -> bool:
        return _SPEAKING[self.event_type][0]

    @property
    def legacy(self) -> bool:
        return _SPEAKING[self.event_type][2]

    @property
    def role(self) -> str | None:
        return self.properties.role or _SPEAKING[self.event_type][1]

    @property
    def interrupted(self) -> bool:
        return bool(self.properties.interrupted)

    @property
    def duration(self) -> float | None:
        return self.properties.duration


class ToolCallEvent(RoomEvent):
    """The LLM called a client tool; `inference_id` is the user turn that caused it."""

    EVENT_TYPES = ("conversation.tool_call",)
    properties: ToolCallProperties

    @property
    def name(self) -> str:
        return self.properties.name

    @property
    def arguments(self) -> str:
        return self.properties.arguments

    @property
    def tool_call_id(self) -> str | None:
        return self.properties.tool_call_id

    @property
    def call_key(self) -> str:
        """Stable identity of the call: its id, or `inference_id:name:seq` when Tavus gave none."""
        if self.tool_call_id:
            return self.tool_call_id
        return f"{self.inference_id or '-'}:{self.name}:{self.seq if self.seq is not None else '-'}"

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object; raises ValueError when they are not a JSON object."""
        text = self.arguments.strip()
        if not text:
            return {}
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("tool arguments must be a JSON object")
        return value


class PerceptionToolCall(RoomEvent):
    EVENT_TYPES = ("conversation.perception_tool_call",)
    properties: PerceptionToolCallProperties

    @property
    def name(self) -> str:
        return self.properties.name


class PerceptionAnalysis(RoomEvent):
    EVENT_TYPES = ("conversation.perception_analysis",)
    properties: PerceptionAnalysisProperties = Field(default_factory=PerceptionAnalysisProperties)

    @property
    def analysis(self) -> Any:
        return self.properties.analysis


class SystemEvent(RoomEvent):
    """Readiness and shutdown in the room."""

    EVENT_TYPES = ("system.replica_joined", "system.replica_present", "system.shutdown")
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_shutdown(self) -> bool:
        return self.event_type == "system.shutdown"

    @property
    def shutdown_reason(self) -> str | None:
        for key in ("shutdown_reason", "reason"):
            value = _to_str(self.properties.get(key))
            if value:
                return value
        return None


class UnknownEvent(RoomEvent):
    """An event type we do not know (yet): kept whole, stored and forwarded."""

    properties: Any = None


class InvalidEvent(BaseModel):
    """Input that is not a usable event. `raw` is what arrived (a dict when it was one)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["invalid"] = "invalid"
    reason: str
    raw: Any = None
    event_type: str | None = None  # set when the message named a (known) type but was malformed


AnyRoomEvent = (
    Utterance
    | UtteranceStreaming
    | SpeakingEvent
    | ToolCallEvent
    | PerceptionToolCall
    | PerceptionAnalysis
    | SystemEvent
    | UnknownEvent
)
ParseResult = AnyRoomEvent | InvalidEvent

_KNOWN: dict[str, type[RoomEvent]] = {
    name: cls
    for cls in (
        Utterance,
        UtteranceStreaming,
        SpeakingEvent,
        ToolCallEvent,
        PerceptionToolCall,
        PerceptionAnalysis,
        SystemEvent,
    )
    for name in cls.EVENT_TYPES
}
KNOWN_EVENT_TYPES = frozenset(_KNOWN)

MAX_REASON = 300


def _describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)[:MAX_REASON]


def parse_event(message: Any) -> ParseResult:
    """Parse one app-message. Never raises; see the module docstring."""
    data: Any = message
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return InvalidEvent(reason="not UTF-8 text", raw=bytes(message)[:1000].hex())
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return InvalidEvent(reason=f"not JSON: {exc}"[:MAX_REASON], raw=message)
    if not isinstance(data, dict):
        return InvalidEvent(reason=f"not a JSON object (got {type(data).__name__})", raw=data)
    event_type = data.get("event_type")
    if not isinstance(event_type, str) or not event_type.strip():
        return InvalidEvent(reason="missing event_type", raw=data)
    normalized = normalize_event_type(event_type)
    cls = _KNOWN.get(normalized, UnknownEvent)
    fields = dict(data)
    fields["event_type"] = normalized
    fields["raw"] = data
    props = data.get("properties")
    if isinstance(props, str) and cls is not UnknownEvent:
        try:
            props = json.loads(props)
        except (ValueError, RecursionError):  # never raise: nested too deep is just unusable
            props = None
    if props is None or (not isinstance(props, dict) and cls is not UnknownEvent):
        fields.pop("properties", None)
    else:
        fields["properties"] = props
    try:
        return cls.model_validate(fields)  # type: ignore[return-value]
    except ValidationError as exc:
        return InvalidEvent(
            reason=f"{normalized}: {_describe_errors(exc)}", raw=data, event_type=normalized
        )
    except (ValueError, TypeError, RecursionError) as exc:  # pragma: no cover - defensive
        return InvalidEvent(reason=f"{normalized}: {exc}"[:MAX_REASON], raw=data)
