"""The long-lived objects one server process shares, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cvi_agent.config import Settings
from cvi_agent.llm.brains import Brain, UpstreamClients, make_brain
from cvi_agent.llm.turns import TurnTracker
from cvi_agent.personas import Persona


@dataclass
class Runtime:
    settings: Settings
    personas: dict[str, Persona]
    upstreams: UpstreamClients
    brains: dict[str, Brain] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    turns: TurnTracker = field(init=False)

    def __post_init__(self) -> None:
        self.turns = TurnTracker(self.settings)

    @classmethod
    def build(cls, settings: Settings, personas: dict[str, Persona]) -> Runtime:
        upstreams = UpstreamClients(settings)
        runtime = cls(settings=settings, personas=personas, upstreams=upstreams)
        for persona in personas.values():
            runtime.brains[persona.name] = make_brain(persona, upstreams)
        return runtime

    async def aclose(self) -> None:
        await self.turns.aclose()
        for brain in self.brains.values():
            await brain.aclose()
        await self.upstreams.aclose()


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
