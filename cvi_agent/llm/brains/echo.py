"""The echo brain: repeats the last user message. A wiring check that needs no model."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from cvi_agent.llm.brains.base import (
    BrainEvent,
    Finish,
    TextDelta,
    ToolCallDelta,
    TurnContext,
    estimate_prompt_tokens,
    estimate_tokens,
)
from cvi_agent.llm.brains.speech import clean_user_text, speak


class EchoBrain:
    """Speaks the user's last words back; proves Tavus → route → SSE works without a model.

    It never chooses a tool, but honours a forced one (`tool_choice` `required` or a named
    function) as OpenAI's API would: the named tool, else the first callable one, called with
    `{}` (a server tool runs here and its result is spoken) — a wiring check for tool calls.
    """

    async def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]:
        """The last user message, cleaned of Tavus's wrapper, paced by the persona's
        `words_per_chunk` and `chunk_delay_ms`."""
        prompt_tokens = estimate_prompt_tokens(ctx)
        tools = ctx.tools
        if tools.choice.mode in ("required", "function"):
            name = tools.choice.name or tools.callable_names()[0]
            call_id = "call_" + secrets.token_hex(8)
            if not tools.is_server(name):
                yield ToolCallDelta(0, call_id, name, "{}")
                yield Finish("tool_calls", prompt_tokens, estimate_tokens("{}"))
                return
            result = await tools.run(
                name,
                "{}",
                call_id,
                ctx.conversation_id,
                side_effects_allowed=ctx.side_effects_allowed,
            )
            text = result.output
        else:
            text = clean_user_text(ctx.request.last_user_text()) or "I didn't catch that."
        cfg = ctx.persona.brain
        delta: TextDelta
        async for delta in speak(text, cfg.words_per_chunk, cfg.chunk_delay_ms):
            yield delta
        yield Finish("stop", prompt_tokens, estimate_tokens(text))

    async def aclose(self) -> None:
        """Nothing to release."""
        return None
