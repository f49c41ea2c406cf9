"""Personas: one YAML file each under CVI_PERSONAS_DIR, validated at startup.

A persona's `name` is the `model` Tavus sends. Errors name the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cvi_agent.protocol.chat import FunctionDef

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
# What the upstream brain itself puts in every upstream request: `brain.extra_body` cannot set
# these (the request's `tools` and `tool_choice` decide the turn's tools, see llm/tools.py).
RESERVED_BODY_KEYS = frozenset(
    {"model", "messages", "stream", "stream_options", "tools", "tool_choice"}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamTarget(_Strict):
    """Another OpenAI-compatible upstream to try when the ones before it fail."""

    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None


class BrainConfig(_Strict):
    kind: Literal["upstream", "flow", "echo"]
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = Field(
        default=None, description="name of an environment variable holding the upstream key"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    first_token_timeout: float | None = Field(default=None, gt=0, le=60)
    reply_timeout: float | None = Field(
        default=None, gt=0, le=600, description="the whole reply's budget; then it ends cleanly"
    )
    fallbacks: list[UpstreamTarget] = Field(
        default_factory=list,
        description="upstreams tried in order when the ones before fail before their first token",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="upstream only: parameters merged into every upstream request, under the "
        "request's own (e.g. {seed: 7, response_format: {type: json_object}})",
    )
    chunk_delay_ms: float = Field(default=0.0, ge=0, le=2000, description="flow/echo pacing")
    words_per_chunk: int = Field(default=3, ge=1, le=50)

    @model_validator(mode="after")
    def _upstream_needs_model(self) -> BrainConfig:
        if self.kind == "upstream" and not self.model:
            raise ValueError("brain.model is required when brain.kind is 'upstream'")
        if self.extra_body and self.kind != "upstream":
            raise ValueError("brain.extra_body applies to upstream brains only")
        reserved = sorted(RESERVED_BODY_KEYS.intersection(self.extra_body))
        if reserved:
            raise ValueError(
                f"brain.extra_body cannot set {', '.join(reserved)}: the server sets them"
            )
        return self


class ToolSpec(_Strict):
    type: Literal["function"] = "function"
    execution: Literal["client", "server"] = "client"
    function: FunctionDef
    handler: str | None = Field(
        default=None,
        description="server tools: a built-in tool name or 'package.module:function'",
    )
    timeout: float | None = Field(default=None, gt=0, le=120)
    side_effects: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    # How the room bot answers a client tool call (used by the bot): tool_result | echo | append_context
    reply: Literal["tool_result", "echo", "append_context"] = "tool_result"

    @property
    def name(self) -> str:
        return self.function.name

    def openai_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class IntentToolCall(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Intent(_Strict):
    name: str
    patterns: list[str] = Field(min_length=1)
    reply: str = ""
    after_tool: str | None = None
    tool: IntentToolCall | None = None
    without_tool: str | None = Field(
        default=None,
        description="spoken instead when the tool cannot be called this turn (a client tool "
        "the request does not declare, or tool_choice none); default: the flow's fallback",
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return patterns


class Question(_Strict):
    id: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    ask: str = Field(min_length=1)


class Questionnaire(_Strict):
    intro: str = ""
    questions: list[Question] = Field(min_length=1)
    acknowledgements: list[str] = Field(default_factory=lambda: ["Got it."])
    outro: str = "That's everything I needed. Thank you!"

    @model_validator(mode="after")
    def _unique_ids(self) -> Questionnaire:
        ids = [q.id for q in self.questions]
        if len(ids) != len(set(ids)):
            raise ValueError("questionnaire question ids must be unique")
        return self


class FlowConfig(_Strict):
    greeting: str | None = None
    intents: list[Intent] = Field(default_factory=list)
    questionnaire: Questionnaire | None = None
    fallback: str = "Sorry, could you say that again?"


class Persona(_Strict):
    name: str = Field(pattern=NAME_RE)
    persona_name: str = Field(min_length=1)
    system_prompt: str = ""
    context: str = ""
    brain: BrainConfig
    flow: FlowConfig | None = None
    tools: list[ToolSpec] = Field(default_factory=list)
    fallback_text: str = "Sorry, give me one second."
    on_upstream_failure: Literal["speak", "error"] | None = Field(
        default=None,
        description="speak: the fallback line, answered 200; error: an OpenAI error (502/503/504) "
        "so the caller's own retries and fallbacks work; default: speak when the request "
        "carries a Tavus conversation id, error otherwise",
    )
    tavus: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> Persona:
        names = [t.name for t in self.tools]
        if len(names) != len(set(names)):
            raise ValueError("tool names must be unique within a persona")
        if self.brain.kind == "flow" and self.flow is None:
            raise ValueError("a persona with brain.kind 'flow' needs a 'flow' section")
        if self.flow is not None:
            for intent in self.flow.intents:
                if intent.tool is not None and intent.tool.name not in names:
                    raise ValueError(
                        f"intent {intent.name!r} calls tool {intent.tool.name!r}, "
                        "which is not declared under 'tools'"
                    )
        return self

    def tool(self, name: str) -> ToolSpec | None:
        for spec in self.tools:
            if spec.name == name:
                return spec
        return None

    def client_tools(self) -> list[ToolSpec]:
        return [t for t in self.tools if t.execution == "client"]


class PersonaError(Exception):
    """A persona file that cannot be used; the message names the file and the field."""


def _format_validation(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{path}: {loc}: {err['msg']}")
    return "\n".join(lines)


def load_persona(path: Path) -> Persona:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PersonaError(f"{path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise PersonaError(f"{path}: cannot read: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise PersonaError(f"{path}: (top level): expected a mapping of persona fields")
    try:
        persona = Persona.model_validate(raw)
    except ValidationError as exc:
        raise PersonaError(_format_validation(path, exc)) from exc
    persona.source = str(path)
    return persona


def load_personas(directory: Path) -> dict[str, Persona]:
    """Load and validate every persona; all errors are collected and raised together."""
    if not directory.is_dir():
        raise PersonaError(f"{directory}: personas directory does not exist")
    personas: dict[str, Persona] = {}
    errors: list[str] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            persona = load_persona(path)
        except PersonaError as exc:
            errors.append(str(exc))
            continue
        if persona.name in personas:
            errors.append(
                f"{path}: name: {persona.name!r} is already used by {personas[persona.name].source}"
            )
            continue
        personas[persona.name] = persona
    if errors:
        raise PersonaError("\n".join(errors))
    return personas


def tavus_persona_payload(
    persona: Persona, public_url: str, api_key: str, replica_id: str | None = None
) -> dict[str, Any]:
    """The body of `POST /v2/personas` that points Tavus's LLM layer at this server."""
    tavus = dict(persona.tavus)
    layers: dict[str, Any] = dict(tavus.pop("layers", {}) or {})
    llm: dict[str, Any] = dict(layers.get("llm", {}) or {})
    llm.update(
        {
            "model": persona.name,
            "base_url": public_url.rstrip("/") + "/v1",
            "api_key": api_key,
            "speculative_inference": True,
        }
    )
    client_tools = [t.openai_tool() for t in persona.client_tools()]
    if client_tools:
        llm["tools"] = client_tools
    layers["llm"] = llm
    payload: dict[str, Any] = {
        "persona_name": persona.persona_name,
        "system_prompt": persona.system_prompt,
        "context": persona.context,
        "pipeline_mode": "full",
        "layers": layers,
    }
    if replica_id:
        payload["default_replica_id"] = replica_id
    payload.update(tavus)
    return payload
