"""The echo brain: repeats the last user message. A wiring check that needs no model."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cvi_agent.llm.brains.base import BrainEvent, Finish, TurnContext, estimate_tokens
from cvi_agent.llm.brains.speech import clean_user_text, speak


class EchoBrain:
    """Speaks the user's last words back; proves Tavus → route → SSE works without a model."""

    async def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]:
        """The last user message, cleaned of Tavus's wrapper, paced by the persona's
        `words_per_chunk` and `chunk_delay_ms`."""
        text = clean_user_text(ctx.request.last_user_text()) or "I didn't catch that."
        cfg = ctx.persona.brain
        async for delta in speak(text, cfg.words_per_chunk, cfg.chunk_delay_ms):
            yield delta
        yield Finish("stop", estimate_tokens(text), estimate_tokens(text))

    async def aclose(self) -> None:
        """Nothing to release."""
        return None
