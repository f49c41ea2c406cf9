"""Tools: the registry of server-side tool handlers, their execution with a timeout, and which
tools a turn may call.

The tools of a turn follow OpenAI's semantics (`ToolRunner`): the request's `tools` are the
caller's, always returned to it as `tool_calls` and never run here (they win over a persona
tool of the same name, schema and all); the persona's `execution: server` tools that the
request does not shadow run here and the brain continues with their result. A persona's
`execution: client` tool is callable only when the request declares it, as Tavus does with the
persona's `layers.llm.tools`; it is what the room bot answers and what `personas push` sends.
`tool_choice` (`ToolChoice`) narrows that set for the turn.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cvi_agent import metrics
from cvi_agent.personas import Persona, ToolSpec

log = logging.getLogger(__name__)

ToolHandler = Callable[[dict[str, Any], "ToolCallContext"], Awaitable[Any]]

BUILTIN_TOOLS: dict[str, ToolHandler] = {}
# Built-ins that act on the world: guarded as `side_effects: true` even if the YAML forgets it.
SIDE_EFFECT_BUILTINS: set[str] = set()


def builtin(name: str, *, side_effects: bool = False) -> Callable[[ToolHandler], ToolHandler]:
    """Register a handler as the built-in tool `name`, the handler a persona gets by naming it.

    `side_effects=True` is for built-ins that act on the world (ordering a video, say):
    they are held until the turn is final even when a persona's YAML forgets to say so.
    Registration happens at import, so the defining module must be imported before personas
    are validated.
    """

    def register(fn: ToolHandler) -> ToolHandler:
        BUILTIN_TOOLS[name] = fn
        if side_effects:
            SIDE_EFFECT_BUILTINS.add(name)
        return fn

    return register


@dataclass(slots=True)
class ToolCallContext:
    """What a tool handler gets besides its arguments (`handler(args, ctx)`).

    Args:
        conversation_id: the conversation the call belongs to (None outside one).
        persona: the persona whose tool this is.
        spec: the tool's declaration in the persona YAML.
        call_id: the model's id for this call (a client tool's result must quote it).
        services: process-wide services a handler may look up by name (e.g. `"videos"`), from
            `ChatService.tool_services`; empty in the room bot.
    """

    conversation_id: str | None
    persona: Persona
    spec: ToolSpec
    call_id: str
    services: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolOutcome:
    """A server tool's outcome, fed back to the model as a `tool` message (not the
    `ToolResult` interaction sent to a room).

    Args:
        call_id: the model's id for the call this answers.
        name: the tool's name.
        output: what the model reads: the handler's result (JSON unless it returned a string),
            or `{"error": …}` with a message safe to show.
        ok: False when `output` is an error.
    """

    call_id: str
    name: str
    output: str
    ok: bool


class ToolError(Exception):
    """A tool failed in a way worth telling the model (the message is safe to show)."""


class SideEffectsNotAllowed(ToolError):
    """A side-effecting tool was asked to run in a turn that never became final (superseded
    or abandoned). Raised, not returned as a result: that generation is being cancelled, so
    nobody would read a result, and the tool must not run."""


@builtin("get_current_time")
async def get_current_time(args: dict[str, Any], ctx: ToolCallContext) -> dict[str, Any]:
    """The current local time in an IANA time zone (e.g. `Europe/Istanbul`)."""
    zone_name = str(args.get("timezone") or args.get("time_zone") or "UTC")
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(f"unknown time zone {zone_name!r}") from exc
    now = datetime.now(zone)
    return {
        "timezone": zone_name,
        "iso": now.isoformat(timespec="seconds"),
        "spoken": now.strftime("%-I:%M %p on %A, %B %-d"),
    }


def resolve_handler(spec: ToolSpec) -> ToolHandler:
    """A server tool's handler: a built-in by name, or `package.module:function`."""
    ref = spec.handler or spec.name
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
            handler = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise LookupError(f"tool {spec.name!r}: cannot import handler {ref!r}: {exc}") from exc
        if not callable(handler):
            raise LookupError(f"tool {spec.name!r}: handler {ref!r} is not callable")
        return handler  # type: ignore[no-any-return]
    if ref in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[ref]
    raise LookupError(
        f"tool {spec.name!r}: no built-in handler named {ref!r} "
        f"(built-ins: {', '.join(sorted(BUILTIN_TOOLS))})"
    )


def validate_persona_tools(persona: Persona) -> list[str]:
    """Problems with a persona's server tools (unknown handlers), as readable lines."""
    problems = []
    for spec in persona.tools:
        if spec.execution == "server":
            try:
                resolve_handler(spec)
            except LookupError as exc:
                problems.append(f"{persona.source or persona.name}: tools.{spec.name}: {exc}")
    return problems


async def _uncancellable(call: Awaitable[Any]) -> Any:
    """Await `call` in its own task: cancelling the caller does not cut it half way."""
    task = asyncio.ensure_future(call)
    task.add_done_callback(_consume_result)
    return await asyncio.shield(task)


def _consume_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a caller cancelled meanwhile must not leave it unobserved


def _encode_output(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class _PersonaTools:
    server: dict[str, ToolSpec]
    names: frozenset[str]
    server_openai: tuple[tuple[str, dict[str, Any]], ...]


_PERSONA_TOOLS: dict[int, tuple[Persona, _PersonaTools]] = {}


def _persona_tools(persona: Persona) -> _PersonaTools:
    """What every request of a persona needs about its tools, computed once per persona."""
    cached = _PERSONA_TOOLS.get(id(persona))
    if cached is not None and cached[0] is persona:
        return cached[1]
    tools = _PersonaTools(
        server={t.name: t for t in persona.tools if t.execution == "server"},
        names=frozenset(t.name for t in persona.tools),
        server_openai=tuple(
            (t.name, t.openai_tool()) for t in persona.tools if t.execution == "server"
        ),
    )
    _PERSONA_TOOLS[id(persona)] = (persona, tools)
    return tools


ChoiceMode = Literal["auto", "none", "required", "function", "other"]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """A request's `tool_choice`, read once per turn.

    Args:
        mode: `auto` (the brain decides; also when the request sent none), `none` (no tool
            call), `required` (some call), `function` (the call to `name`), `other` (a shape
            this server does not interpret, e.g. `allowed_tools`: forwarded to an upstream,
            refused by brains without a model).
        name: the forced function's name (mode `function` only).
    """

    mode: ChoiceMode = "auto"
    name: str | None = None

    @classmethod
    def parse(cls, value: str | dict[str, Any] | None) -> ToolChoice:
        """From the validated request field (a string is one of none/auto/required)."""
        if value is None or value == "auto":
            return AUTO
        if value == "none":
            return cls("none")
        if value == "required":
            return cls("required")
        if isinstance(value, dict) and value.get("type") == "function":
            function = value.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str) and name:
                return cls("function", name)
        return cls("other")


AUTO = ToolChoice()


class ToolRunner:
    """The tools of one turn (which may be called, which run here) and the runner of its
    server tools. One per request.

    Callable this turn: the request's tools plus the persona's server tools that the request
    does not shadow (see the module doc); `choice` narrows that. A tool with `side_effects:
    true` (or a built-in registered with `side_effects=True`) runs only when side effects are
    allowed, or once `await_final` (set by the turn tracker for requests that may still be
    speculative) says the turn is final; a turn cancelled while it waits never runs the tool.
    Once started, a tool declared `side_effects: true` runs to its end even if the turn is
    cancelled under it.

    Args:
        persona: the persona whose server tools this runs.
        request_tools: names of the tools the request itself declared, in its order: the
            caller's tools, returned to it and never run here.
        default_timeout: seconds a handler may take when its spec sets no `timeout`.
        services: handed to every handler as `ToolCallContext.services`.
        choice: the request's `tool_choice`.
    """

    def __init__(
        self,
        persona: Persona,
        request_tools: list[str],
        default_timeout: float,
        services: Mapping[str, Any] | None = None,
        choice: ToolChoice = AUTO,
    ) -> None:
        self.persona = persona
        self.default_timeout = default_timeout
        self.services: Mapping[str, Any] = services if services is not None else {}
        self.await_final: Callable[[], Awaitable[bool]] | None = None
        self.choice = choice
        self.request_tools = request_tools
        tools = _persona_tools(persona)
        self.client_names = frozenset(request_tools)
        self.server: dict[str, ToolSpec] = tools.server
        if request_tools and not self.client_names.isdisjoint(tools.server):
            self.server = {n: s for n, s in tools.server.items() if n not in self.client_names}

    def metric_label(self, name: str | None) -> str:
        """`name` as the `cvi_tool_calls` label: bounded, since a model can call anything."""
        return metrics.tool_label(name, _persona_tools(self.persona).names, self.client_names)

    def is_server(self, name: str | None) -> bool:
        """Whether the brain runs this call itself instead of streaming it to the client."""
        return name is not None and name in self.server

    def is_client(self, name: str | None) -> bool:
        """Whether this call goes back to the caller: the request declared the tool."""
        return name is not None and name in self.client_names

    def callable_names(self) -> list[str]:
        """Every tool callable this turn, the request's first (in its order)."""
        return [*self.request_tools, *(n for n in self.server if n not in self.client_names)]

    def may_call(self, name: str | None) -> bool:
        """Whether a call to `name` may be made (run or returned) this turn under `choice`;
        a call the model makes anyway is dropped."""
        if name is None or not (name in self.client_names or name in self.server):
            return False
        mode = self.choice.mode
        if mode == "none":
            return False
        return mode != "function" or name == self.choice.name

    def openai_tools(
        self, request_tools: list[dict[str, Any]] | None, server: bool = True
    ) -> list[dict[str, Any]]:
        """The `tools` sent to a model: the request's as it sent them, then the persona's
        server tools it does not shadow (`server` False: none of those)."""
        tools = list(request_tools or ())
        if server:
            for name, tool in _persona_tools(self.persona).server_openai:
                if name in self.server:
                    tools.append(tool)
        return tools

    async def run(
        self,
        name: str,
        arguments: str,
        call_id: str,
        conversation_id: str | None,
        side_effects_allowed: bool = True,
    ) -> ToolOutcome:
        """Run one server tool call under its timeout.

        Every failure of the tool itself (unknown name, bad JSON, timeout, a handler error)
        comes back as a result with `ok` False that the model can read; only
        `SideEffectsNotAllowed` and cancellation propagate. `call_id` and `conversation_id`
        are passed to the handler.
        """
        spec = self.server.get(name)
        if spec is None:
            return ToolOutcome(
                call_id, name, _encode_output({"error": f"unknown tool {name}"}), False
            )
        if not side_effects_allowed and (
            spec.side_effects or (spec.handler or spec.name) in SIDE_EFFECT_BUILTINS
        ):
            if self.await_final is None or not await self.await_final():
                metrics.tool_call(name, "server", "blocked")
                raise SideEffectsNotAllowed(f"tool {name!r} has side effects")
        try:
            args = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(args, dict):
                raise ToolError("arguments must be a JSON object")
            handler = resolve_handler(spec)
            ctx = ToolCallContext(conversation_id, self.persona, spec, call_id, self.services)
            call = asyncio.wait_for(
                handler(args, ctx), timeout=spec.timeout or self.default_timeout
            )
            if spec.side_effects:
                result = await _uncancellable(call)
            else:
                result = await call
            metrics.tool_call(name, "server", "ok")
            return ToolOutcome(call_id, name, _encode_output(result), True)
        except SideEffectsNotAllowed:
            raise
        except json.JSONDecodeError:
            error = "arguments are not valid JSON"
        except TimeoutError:
            error = "the tool timed out"
        except ToolError as exc:
            error = str(exc)
        except LookupError as exc:
            error = str(exc)
        except Exception:
            log.exception("server tool %s failed", name)
            error = "the tool failed"
        metrics.tool_call(name, "server", "error")
        return ToolOutcome(call_id, name, _encode_output({"error": error}), False)
