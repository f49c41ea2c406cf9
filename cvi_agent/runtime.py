"""The long-lived objects one server process shares, built once in the app's lifespan."""

from __future__ import annotations

import gc
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
        tune_gc()
        return runtime

    async def aclose(self) -> None:
        await self.turns.aclose()
        for brain in self.brains.values():
            await brain.aclose()
        await self.upstreams.aclose()


_GC_TUNED = False


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path (once per process).

    Profiling under `cvi-agent bench` showed ~9% of the server's CPU in collections and full
    collections pausing the event loop for tens of ms, mostly traversing objects that live as
    long as the process (modules, the app, pydantic schemas). Freezing them after start-up
    takes them out of every later collection; a higher first threshold runs the young
    collection less often (streamed chunks are freed by reference counting anyway).
    """
    global _GC_TUNED
    if _GC_TUNED:
        return
    _GC_TUNED = True
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 10_000), max(gen1, 20), gen2)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
