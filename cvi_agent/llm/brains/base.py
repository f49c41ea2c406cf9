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
    """A piece of the reply's text, in speaking order; empty pieces are skipped on the wire.

    Args:
        text: the piece.
        choice: which choice it belongs to (`n` > 1 on an upstream persona; else 0).
        logprobs: the upstream's `logprobs` for this piece, passed through as it sent them
            (only when the request asked for logprobs).
    """

    text: str
    choice: int = 0
    logprobs: Any = None


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a client tool call, exactly as OpenAI streams it (by `index`).

    Only client tools are ever yielded: server tools run inside the brain and never reach the
    caller. The first fragment of a call carries `id` and `name`; later ones only `arguments`.

    Args:
        index: which call of this reply the fragment belongs to (0, 1, … in order of first
            appearance among the client calls).
        id: the call id, on the call's first fragment only (else None).
        name: the tool's name, on the call's first fragment only (else None).
        arguments: the next piece of the JSON arguments text (may be empty).
        choice: which choice it belongs to (`n` > 1 on an upstream persona; else 0).
    """

    index: int
    id: str | None
    name: str | None
    arguments: str
    choice: int = 0


@dataclass(slots=True)
class Finish:
    """The last event of every reply: why it ended, and the token usage to report.

    Exactly one ends a brain's stream; a consumer that never sees one (the brain failed or was
    cancelled) ends the reply itself with `stop`. Brains without a tokenizer estimate the
    counts (`estimate_tokens`, `estimate_prompt_tokens`).

    Args:
        reason: why the first choice ended: stop | length | tool_calls.
        prompt_tokens: tokens of the request, as the model counted them (or an estimate).
        completion_tokens: tokens of the reply (every choice), likewise.
        others: with `n` > 1, the finish reasons of the other choices by index.
    """

    reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    others: dict[int, str] | None = None


BrainEvent = TextDelta | ToolCallDelta | Finish


@dataclass(slots=True)
class TurnContext:
    """Everything a brain may use for one request, built once by the route (`build_turn`).

    Args:
        request: the validated chat-completions request.
        persona: the persona the request's `model` names.
        settings: the process's settings (timeouts, tool rounds).
        tools: this request's tool runner (server tools run through it; it also knows which
            names are client tools).
        conversation_id: from Tavus's conversation-id header; None outside a conversation
            (then nothing is speculative and the turn is not recorded).
        side_effects_allowed: False while the turn tracker may still supersede or abandon
            the generation; side-effecting tools then wait for the turn to settle.
        state: per-request scratch space shared by the route, the brain and the recorder
            (`raw` (the parsed body, what the upstream brain forwards), `raw_messages`,
            `raw_tools`, `request_id`, `started`, `upstream_ttft`, `ttft`, `answers`, `fallback`
            (llm/failure.py)).
    """

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
    """Answers turns. One instance per persona serves every request concurrently, so all
    per-turn state lives in the `TurnContext` or the generator's frame, never on the brain."""

    def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]:
        """The reply as events, ending with one `Finish`.

        The caller always closes the generator (`aclose()`), also when the client left or the
        turn was superseded: a brain releases whatever it holds (the upstream stream) in its
        `finally`/`async with`. An exception before the first event makes the route speak the
        persona's fallback line; after it, the reply is ended cleanly.
        """
        ...

    async def aclose(self) -> None:
        """Release what the brain owns, at shutdown (shared clients are closed by their owner)."""
        ...


def usage_of(ctx: TurnContext, finish: Finish) -> tuple[int, int] | None:
    """The token counts for a stream's final usage chunk, when the request asked for one."""
    opts = ctx.request.stream_options
    if opts is not None and opts.include_usage:
        return finish.prompt_tokens, finish.completion_tokens
    return None


def estimate_tokens(text: str) -> int:
    """A cheap token estimate for usage reporting by brains that have no tokenizer."""
    return max(1, (len(text) + 3) // 4) if text else 0


def estimate_prompt_tokens(ctx: TurnContext) -> int:
    """An estimate of the request's prompt tokens for brains without a model: about four
    characters a token, plus OpenAI's few tokens of framing per message (documented as an
    estimate; it is what a caller's cost accounting gets from a flow or echo persona)."""
    total = 3
    for message in ctx.request.messages:
        total += 4 + estimate_tokens(message.text())
        for call in message.tool_calls or ():
            total += estimate_tokens(call.function.name) + estimate_tokens(call.function.arguments)
    return total
