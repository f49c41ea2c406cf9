"""Interactions Protocol messages we SEND into the room (TAVUS_PROTOCOL §2), and the API's
request shapes for them. Output is exact: `to_message()` is the app-message to broadcast.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Sensitivity = Literal["low", "medium", "high"]


class _Interaction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: str = ""  # set per subclass

    def properties(self) -> dict[str, Any] | None:
        return None

    def to_message(self, conversation_id: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_type": "conversation",
            "event_type": self.event_type,
            "conversation_id": conversation_id,
        }
        props = self.properties()
        if props is not None:
            message["properties"] = props
        return message


class Echo(_Interaction):
    """Spoken verbatim by the replica; skips the LLM."""

    type: Literal["echo"] = "echo"
    text: str = Field(min_length=1, max_length=10_000)
    event_type: Literal["conversation.echo"] = "conversation.echo"

    def properties(self) -> dict[str, Any]:
        return {"modality": "text", "text": self.text}


class EchoAudio(_Interaction):
    """One chunk of base64 16-bit mono PCM; all chunks of one utterance share `inference_id`."""

    type: Literal["echo_audio"] = "echo_audio"
    audio: str = Field(min_length=1)
    sample_rate: int = Field(default=24000, ge=8000, le=48000)
    inference_id: str = Field(min_length=1, max_length=128)
    done: bool = False
    event_type: Literal["conversation.echo"] = "conversation.echo"

    def properties(self) -> dict[str, Any]:
        return {
            "modality": "audio",
            "audio": self.audio,
            "sample_rate": self.sample_rate,
            "inference_id": self.inference_id,
            "done": self.done,
        }


class Respond(_Interaction):
    """Treated as if the user said it: goes through the LLM."""

    type: Literal["respond"] = "respond"
    text: str = Field(min_length=1, max_length=10_000)
    event_type: Literal["conversation.respond"] = "conversation.respond"

    def properties(self) -> dict[str, Any]:
        return {"text": self.text}


class Interrupt(_Interaction):
    type: Literal["interrupt"] = "interrupt"
    event_type: Literal["conversation.interrupt"] = "conversation.interrupt"


class OverwriteContext(_Interaction):
    """Replaces the conversation's `conversational_context` (the `_llm_` name is the right one)."""

    type: Literal["overwrite_context"] = "overwrite_context"
    context: str = Field(max_length=100_000)
    event_type: Literal["conversation.overwrite_llm_context"] = "conversation.overwrite_llm_context"

    def properties(self) -> dict[str, Any]:
        return {"context": self.context}


class AppendContext(_Interaction):
    type: Literal["append_context"] = "append_context"
    context: str = Field(min_length=1, max_length=100_000)
    job_status: str | None = None
    event_type: Literal["conversation.append_llm_context"] = "conversation.append_llm_context"

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {"context": self.context}
        if self.job_status is not None:
            props["job_status"] = self.job_status
        return props


class SetSensitivity(_Interaction):
    """Exactly one of the two sensitivities per message."""

    type: Literal["sensitivity"] = "sensitivity"
    participant_pause_sensitivity: Sensitivity | None = None
    participant_interrupt_sensitivity: Sensitivity | None = None
    event_type: Literal["conversation.sensitivity"] = "conversation.sensitivity"

    @model_validator(mode="after")
    def _exactly_one(self) -> SetSensitivity:
        given = [
            v
            for v in (self.participant_pause_sensitivity, self.participant_interrupt_sensitivity)
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of participant_pause_sensitivity, participant_interrupt_sensitivity"
            )
        return self

    def properties(self) -> dict[str, Any]:
        if self.participant_pause_sensitivity is not None:
            return {"participant_pause_sensitivity": self.participant_pause_sensitivity}
        return {"participant_interrupt_sensitivity": self.participant_interrupt_sensitivity}


class ToolResult(_Interaction):
    type: Literal["tool_result"] = "tool_result"
    tool_call_id: str = Field(min_length=1, max_length=256)
    output: str = Field(max_length=100_000)
    status: Literal["success", "error"] = "success"
    event_type: Literal["conversation.tool_result"] = "conversation.tool_result"

    @field_validator("output", mode="before")
    @classmethod
    def _encode_objects(cls, value: Any) -> Any:
        if isinstance(value, dict | list | int | float | bool) or value is None:
            return json.dumps(value, ensure_ascii=False)
        return value

    def properties(self) -> dict[str, Any]:
        return {"tool_call_id": self.tool_call_id, "output": self.output, "status": self.status}


Interaction = Annotated[
    Echo
    | EchoAudio
    | Respond
    | Interrupt
    | OverwriteContext
    | AppendContext
    | SetSensitivity
    | ToolResult,
    Field(discriminator="type"),
]


class InteractionRequest(BaseModel):
    """Body of `POST /api/conversations/{id}/interactions`."""

    interaction: Interaction

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> Interaction:
        return cls.model_validate({"interaction": payload}).interaction
