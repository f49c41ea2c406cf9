"""The chat-completions service: everything the LLM routes need, built once per process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cvi_agent.config import Settings
from cvi_agent.llm.brains import Brain, UpstreamClients, make_brain
from cvi_agent.llm.coordination import TurnCoordinator
from cvi_agent.llm.recording import TurnRecorder
from cvi_agent.llm.shared_turns import SharedTurns
from cvi_agent.llm.sse import fingerprint
from cvi_agent.llm.turns import TurnTracker
from cvi_agent.personas import Persona


@dataclass
class ChatService:
    """One brain per persona, the upstream clients they share, and the turn tracker.

    Built by `ChatService.start` in the app's lifespan; the routes reach it as
    `request.app.state.chat`. Personas are fixed for the life of the process.

    Args:
        settings: the process's settings.
        personas: the loaded personas by name (a request's `model` names one).
        upstreams: the upstream clients and circuit breakers the brains share.
        brains: one brain per persona name, serving all of that persona's requests.
        turns: who answers streamed requests with a conversation id: this process's turn
            tracker, or, with `CVI_REDIS_URL`, the turns shared between processes.
        recorder: the conversation service's turn recorder, where finished turns go off the
            hot path; without it turns are not recorded.
        tool_services: the process-wide services a persona's server-tool handler may look up
            by name in `ToolCallContext.services` (e.g. `"videos"`): an extension point for
            handlers written outside this package, so a read-only mapping, not typed fields.
        fingerprints: each persona's `system_fingerprint` (the server's version and the
            persona's configuration), computed once; filled in from `personas` when omitted.
    """

    settings: Settings
    personas: dict[str, Persona]
    upstreams: UpstreamClients
    brains: dict[str, Brain]
    turns: TurnCoordinator
    recorder: TurnRecorder | None = None
    tool_services: Mapping[str, object] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, persona in self.personas.items():
            if name not in self.fingerprints:
                self.fingerprints[name] = fingerprint(persona.model_dump_json())

    @classmethod
    def start(
        cls,
        settings: Settings,
        personas: dict[str, Persona],
        recorder: TurnRecorder | None = None,
    ) -> ChatService:
        """Build the brains and the turn tracker (shared over Redis when `redis_url` is set;
        the runtime starts it); finished turns go to `recorder`."""
        upstreams = UpstreamClients(settings)
        brains = {p.name: make_brain(p, upstreams) for p in personas.values()}
        tracker = TurnTracker(settings)
        if recorder is not None:
            tracker.observer = recorder.observe
        turns: TurnCoordinator = SharedTurns(settings, tracker) if settings.redis_url else tracker
        return cls(settings, personas, upstreams, brains, turns, recorder)

    async def aclose(self) -> None:
        """Cancel open generations, then close the brains and their upstream connections."""
        await self.turns.aclose()
        for brain in self.brains.values():
            await brain.aclose()
        await self.upstreams.aclose()
