"""What every brain shares: the turn context it gets and the events it yields.

A brain is an async generator of `TextDelta`, `ToolCallDelta` and one final `Finish`. The route
turns those into SSE chunks (or one `chat.completion` object); brains never see the wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cvi_agent.config import Settings
    from cvi_agent.llm.tools import ToolRunner
    from cvi_agent.personas import Persona
    from cvi_agent.protocol.chat import ChatCompletionRequest


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a client tool call, exactly as OpenAI streams it (by `index`)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(slots=True)
class Finish:
    reason: str  # stop | length | tool_calls
    prompt_tokens: int = 0
    completion_tokens: int = 0


BrainEvent = TextDelta | ToolCallDelta | Finish


@dataclass(slots=True)
class TurnContext:
    """Everything a brain may use for one request."""

    request: ChatCompletionRequest
    persona: Persona
    settings: Settings
    tools: ToolRunner
    conversation_id: str | None = None
    # False while the generation can still be superseded or abandoned (speculative inference):
    # tools with side effects must not run then.
    side_effects_allowed: bool = True
    state: dict[str, Any] = field(default_factory=dict)


class Brain(Protocol):
    def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]: ...

    async def aclose(self) -> None: ...


def usage_of(ctx: TurnContext, finish: Finish) -> tuple[int, int] | None:
    """The token counts for a stream's final usage chunk, when the request asked for one."""
    opts = ctx.request.stream_options
    if opts is not None and opts.include_usage:
        return finish.prompt_tokens, finish.completion_tokens
    return None


def estimate_tokens(text: str) -> int:
    """A cheap token estimate for usage reporting by brains that have no tokenizer."""
    return max(1, (len(text) + 3) // 4) if text else 0
