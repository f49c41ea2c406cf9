"""Incoming room events: every fixture, every accepted spelling, and nothing that raises."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvi_agent.protocol.events import (
    KNOWN_EVENT_TYPES,
    InvalidEvent,
    PerceptionAnalysis,
    PerceptionToolCall,
    SpeakingEvent,
    SystemEvent,
    ToolCallEvent,
    UnknownEvent,
    Utterance,
    UtteranceStreaming,
    parse_event,
)
from tests.support import FIXTURES, load_fixture


@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "json-string"])
def test_fixture_user_utterance(as_text: bool) -> None:
    raw = load_fixture("event_utterance_user.json")
    event = parse_event(json.dumps(raw) if as_text else raw)
    assert isinstance(event, Utterance)
    assert event.role == "user"
    assert event.speech == "What's the weather in San Francisco?"
    assert (event.seq, event.turn_idx, event.timestamp) == (42, 3, 1746000000.1)
    assert event.inference_id == "83294d9f-8306-491b-a284-791f56c8383f"
    assert event.conversation_id == "c0a1b2c3d4"
    assert event.raw == raw  # kept exactly as received


def test_fixture_streaming_final_interrupted() -> None:
    event = parse_event(load_fixture("event_utterance_streaming_final.json"))
    assert isinstance(event, UtteranceStreaming)
    assert event.role == "replica"
    assert event.speech == "It's sixty-eight degrees and"
    assert event.final is True and event.is_interrupted is True
    assert event.properties.content_index == 0


def test_fixture_stopped_speaking() -> None:
    event = parse_event(load_fixture("event_stopped_speaking.json"))
    assert isinstance(event, SpeakingEvent)
    assert (event.started, event.legacy, event.role) == (False, False, "replica")
    assert event.interrupted is True
    assert event.duration == pytest.approx(1.42)


def test_fixture_tool_call() -> None:
    event = parse_event(load_fixture("event_tool_call.json"))
    assert isinstance(event, ToolCallEvent)
    assert event.name == "get_current_weather"
    assert event.tool_call_id == "call_abc"
    assert event.call_key == "call_abc"
    assert event.parsed_arguments() == {"location": "San Francisco, CA", "unit": "fahrenheit"}


def test_fixtures_all_parse_to_known_models() -> None:
    files = sorted(FIXTURES.glob("event_*.json"))
    assert len(files) >= 4
    for path in files:
        event = parse_event(path.read_bytes())
        assert not isinstance(event, InvalidEvent | UnknownEvent), path.name
        assert event.event_type in KNOWN_EVENT_TYPES


@pytest.mark.parametrize(
    ("props", "role", "speech"),
    [
        ({"role": "replica", "speech": "hi"}, "replica", "hi"),
        ({"role": "pal", "speech": "hi"}, "replica", "hi"),
        ({"role": "PAL", "text": "hi"}, "replica", "hi"),
        ({"role": "user", "text": "hello"}, "user", "hello"),
        ({"role": " User ", "speech": "hello", "text": "ignored"}, "user", "hello"),
    ],
)
def test_utterance_aliases(props: dict[str, Any], role: str, speech: str) -> None:
    event = parse_event({"event_type": "conversation.utterance", "properties": props})
    assert isinstance(event, Utterance)
    assert (event.role, event.speech) == (role, speech)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        (1, True),
        ("false", False),
        ("0", False),
        (False, False),
    ],
)
def test_string_booleans(value: Any, expected: bool) -> None:
    event = parse_event(
        {
            "event_type": "conversation.utterance.streaming",
            "properties": {
                "role": "replica",
                "speech": "x",
                "final": value,
                "is_interrupted": value,
            },
        }
    )
    assert isinstance(event, UtteranceStreaming)
    assert event.final is expected and event.is_interrupted is expected


def test_numbers_as_strings_and_junk_numbers() -> None:
    event = parse_event(
        {
            "event_type": "conversation.stopped_speaking",
            "seq": "58",
            "turn_idx": "3.0",
            "timestamp": "1746000002.5",
            "properties": {"role": "replica", "duration": "1.5", "interrupted": "false"},
        }
    )
    assert isinstance(event, SpeakingEvent)
    assert (event.seq, event.turn_idx, event.timestamp) == (58, 3, 1746000002.5)
    assert event.duration == 1.5 and event.interrupted is False
    junk = parse_event(
        {
            "event_type": "conversation.stopped_speaking",
            "seq": "abc",
            "timestamp": [1],
            "properties": {},
        }
    )
    assert isinstance(junk, SpeakingEvent)  # unusable numbers are unknown, not fatal
    assert junk.seq is None and junk.timestamp is None


def test_iso_timestamp() -> None:
    event = parse_event(
        {
            "event_type": "system.replica_joined",
            "timestamp": "2025-04-30T08:00:00Z",
            "properties": {},
        }
    )
    assert isinstance(event, SystemEvent)
    assert event.timestamp == 1746000000.0


def test_hyphenated_perception_analysis() -> None:
    raw = {"event_type": "conversation.perception-analysis", "properties": {"analysis": "smiling"}}
    event = parse_event(raw)
    assert isinstance(event, PerceptionAnalysis)
    assert event.event_type == "conversation.perception_analysis"
    assert event.analysis == "smiling"
    assert event.raw["event_type"] == "conversation.perception-analysis"  # raw stays raw


def test_perception_tool_call_vision_and_audio() -> None:
    vision = parse_event(
        {
            "event_type": "conversation.perception_tool_call",
            "properties": {
                "name": "detect_id",
                "modality": "vision",
                "arguments": {"card": "passport"},
                "frames": [{"data": "AAA", "mime_type": "image/jpeg"}],
            },
        }
    )
    assert isinstance(vision, PerceptionToolCall)
    assert vision.properties.arguments == {"card": "passport"}
    assert vision.properties.frames == [{"data": "AAA", "mime_type": "image/jpeg"}]
    audio = parse_event(
        {
            "event_type": "conversation.perception_tool_call",
            "properties": {"name": "tone", "modality": "audio", "arguments": '{"x": 1}'},
        }
    )
    assert isinstance(audio, PerceptionToolCall)
    assert audio.properties.arguments == '{"x": 1}'


@pytest.mark.parametrize(
    ("event_type", "role", "started", "legacy"),
    [
        ("conversation.started_speaking", None, True, False),
        ("conversation.replica.started_speaking", "replica", True, True),
        ("conversation.replica.stopped_speaking", "replica", False, True),
        ("conversation.user.started_speaking", "user", True, True),
        ("conversation.user.stopped_speaking", "user", False, True),
    ],
)
def test_speaking_families(event_type: str, role: str | None, started: bool, legacy: bool) -> None:
    event = parse_event({"event_type": event_type})
    assert isinstance(event, SpeakingEvent)
    assert (event.role, event.started, event.legacy) == (role, started, legacy)


def test_tool_call_arguments_object_and_missing_id() -> None:
    event = parse_event(
        {
            "event_type": "conversation.tool_call",
            "inference_id": "inf-1",
            "seq": 7,
            "properties": {"name": "lookup", "arguments": {"q": "x"}},
        }
    )
    assert isinstance(event, ToolCallEvent)
    assert json.loads(event.arguments) == {"q": "x"}
    assert event.tool_call_id is None
    assert event.call_key == "inf-1:lookup:7"
    bad = parse_event(
        {"event_type": "conversation.tool_call", "properties": {"name": "x", "arguments": "[1]"}}
    )
    assert isinstance(bad, ToolCallEvent)
    with pytest.raises(ValueError):
        bad.parsed_arguments()


def test_shutdown_reason() -> None:
    event = parse_event(
        {
            "event_type": "system.shutdown",
            "properties": {"shutdown_reason": "participant_left_timeout"},
        }
    )
    assert isinstance(event, SystemEvent)
    assert event.is_shutdown and event.shutdown_reason == "participant_left_timeout"


def test_properties_as_json_string() -> None:
    event = parse_event(
        {
            "event_type": "conversation.utterance",
            "properties": json.dumps({"role": "user", "speech": "x"}),
        }
    )
    assert isinstance(event, Utterance) and event.speech == "x"


def test_unknown_event_type_is_kept_whole() -> None:
    raw = {
        "message_type": "conversation",
        "event_type": "conversation.something_new",
        "seq": 9,
        "properties": {"a": [1, 2, {"b": None}]},
        "extra_top_level": True,
    }
    event = parse_event(json.dumps(raw))
    assert isinstance(event, UnknownEvent)
    assert event.raw == raw
    assert event.properties == {"a": [1, 2, {"b": None}]}
    assert event.seq == 9


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json {", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "not a JSON object"),
        (42, "not a JSON object"),
        (None, "not a JSON object"),
        ({"properties": {}}, "missing event_type"),
        ({"event_type": ""}, "missing event_type"),
        ({"event_type": 5}, "missing event_type"),
        ({"event_type": "conversation.utterance", "properties": {"role": "user"}}, "speech"),
        ({"event_type": "conversation.tool_call", "properties": {"arguments": "{}"}}, "name"),
        ({"event_type": "conversation.utterance", "properties": [1]}, "properties"),
    ],
)
def test_malformed_input_is_a_typed_invalid_result(message: Any, reason: str) -> None:
    result = parse_event(message)
    assert isinstance(result, InvalidEvent)
    assert reason in result.reason


def test_invalid_known_type_keeps_its_name_and_raw() -> None:
    raw = {"event_type": "conversation.utterance", "properties": {"role": "user"}}
    result = parse_event(raw)
    assert isinstance(result, InvalidEvent)
    assert result.event_type == "conversation.utterance"
    assert result.raw == raw


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    event_type=st.sampled_from(
        [*sorted(KNOWN_EVENT_TYPES), "x.y", "conversation.perception-analysis"]
    ),
    top=st.dictionaries(
        st.sampled_from(["seq", "turn_idx", "timestamp", "inference_id", "conversation_id"]),
        json_values,
    ),
    props=json_values,
)
def test_parse_never_raises(event_type: str, top: dict[str, Any], props: Any) -> None:
    message = {"event_type": event_type, **top, "properties": props}
    result = parse_event(message)
    assert result.raw is not None or isinstance(result, InvalidEvent)
    parse_event(json.dumps(message, default=str))
