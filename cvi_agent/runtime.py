"""The long-lived objects one server process shares, built once in the app's lifespan."""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cvi_agent.config import Settings
from cvi_agent.conversations.service import Record
from cvi_agent.llm.brains import Brain, UpstreamClients, make_brain
from cvi_agent.llm.brains.base import TurnContext
from cvi_agent.llm.turns import TurnTracker
from cvi_agent.personas import Persona
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
    turns: TurnTracker = field(init=False)

    def __post_init__(self) -> None:
        self.turns = TurnTracker(self.settings)

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
        runtime.turns.observer = functools.partial(_note_turn, runtime)
        tune_gc()
        return runtime

    async def aclose(self) -> None:
        await self.turns.aclose()
        if self.record is not None:
            await self.record.aclose()
        for brain in self.brains.values():
            await brain.aclose()
        await self.upstreams.aclose()
        await self.store.aclose()


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


def _note_turn(
    runtime: Runtime,
    ctx: TurnContext,
    completion_id: str,
    started: float,
    first: float | None,
    completed: bool,
    chunks: int,
) -> None:
    from cvi_agent.llm.recording import note_turn

    note_turn(
        runtime,
        ctx,
        completion_id,
        started=started,
        first=first,
        completed=completed,
        chunks=chunks,
    )
