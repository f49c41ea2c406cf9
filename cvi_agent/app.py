"""FastAPI app factory: routers and lifespan wiring, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cvi_agent import __version__
from cvi_agent.config import Settings
from cvi_agent.http import install_error_handlers
from cvi_agent.llm.routes import router as llm_router
from cvi_agent.llm.tools import validate_persona_tools
from cvi_agent.metrics import router as metrics_router
from cvi_agent.personas import Persona, PersonaError, load_personas
from cvi_agent.runtime import Runtime


def load_checked_personas(settings: Settings) -> dict[str, Persona]:
    personas = load_personas(settings.personas_dir)
    problems = [p for persona in personas.values() for p in validate_persona_tools(persona)]
    if problems:
        raise PersonaError("\n".join(problems))
    return personas


def create_app(
    settings: Settings | None = None, personas: dict[str, Persona] | None = None
) -> FastAPI:
    settings = settings or Settings()
    if personas is None:
        personas = load_checked_personas(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime.build(settings, personas)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.aclose()

    app = FastAPI(
        title="cvi-agent",
        version=__version__,
        summary="Custom LLM backend, live orchestration and callback ingestion for Tavus CVI.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(llm_router)
    app.include_router(metrics_router)

    @app.get("/healthz", summary="Liveness", tags=["ops"])
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "personas": len(personas)}

    return app
