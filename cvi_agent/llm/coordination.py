"""Who answers a conversation's speculative turns: the interface both implementations share.

`TurnTracker` (llm/turns.py) is the in-process one: every turn of a conversation is answered by
the process that received it, which is all one process needs (and what every process falls
back to when Redis is unreachable). `SharedTurns` (llm/shared_turns.py), used when
`CVI_REDIS_URL` is set, makes one process the owner of each conversation and forwards the
turns other processes receive to it, so supersede, replay and the side-effect settle clock
work across processes exactly as in one. See ARCHITECTURE.md, "Speculative turns across
processes".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvi_agent.llm.brains.base import Brain, TurnContext
    from cvi_agent.llm.sse import ChunkEncoder, PushBody

#: Turns a forwarded request (its JSON body, conversation id and request id) back into what
#: `open` takes: the persona's brain, the validated context and a chunk encoder. Raises
#: `ApiError` when the request is not valid here. Set by the runtime (llm/forwarding.py).
Accept = Callable[[dict[str, Any], str, "str | None"], "tuple[Brain, TurnContext, ChunkEncoder]"]


class TurnCoordinator:
    """Answers streamed requests that carry a conversation id (see the module doc)."""

    def open(self, brain: Brain, ctx: TurnContext, enc: ChunkEncoder, started: float) -> PushBody:
        """The response body answering `ctx`; the caller must `aclose()` it (the response
        does). `started` is `time.perf_counter()` when the request was parsed."""
        raise NotImplementedError

    async def start(self, accept: Accept) -> None:
        """Start serving turns forwarded by other processes (nothing to do in one process)."""

    def active(self) -> int:
        """Generations still running in this process (for tests and shutdown)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Cancel every running generation and stop (shutdown)."""
        raise NotImplementedError
