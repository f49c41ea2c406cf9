"""The long-lived objects one server process shares, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cvi_agent.config import Settings
from cvi_agent.llm.brains import Brain, UpstreamClients, make_brain
from cvi_agent.personas import Persona
from cvi_agent.record import Record
from cvi_agent.store import SqlStore


@dataclass
class Runtime:
    settings: Settings
    personas: dict[str, Persona]
    upstreams: UpstreamClients
    store: SqlStore
    brains: dict[str, Brain] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    # Callbacks, API, live feed, worker (record.py); None only before `start`.
    record: Record | None = None

    @classmethod
    async def start(cls, settings: Settings, personas: dict[str, Persona]) -> Runtime:
        """Open every shared resource (the store runs its migrations here)."""
        store = SqlStore(settings.database_url)
        await store.init()
        upstreams = UpstreamClients(settings)
        runtime = cls(settings=settings, personas=personas, upstreams=upstreams, store=store)
        for persona in personas.values():
            runtime.brains[persona.name] = make_brain(persona, upstreams)
        runtime.record = await Record.start(settings, store, personas)
        return runtime

    async def aclose(self) -> None:
        if self.record is not None:
            await self.record.aclose()
        for brain in self.brains.values():
            await brain.aclose()
        await self.upstreams.aclose()
        await self.store.aclose()


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
