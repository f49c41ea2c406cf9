"""FastAPI app factory: routers and lifespan wiring, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from cvi_agent import __version__
from cvi_agent.config import Settings
from cvi_agent.conversations.api import router as api_router
from cvi_agent.conversations.callbacks import router as callbacks_router
from cvi_agent.devtools.memdebug import start_from_env as start_memory_reporter
from cvi_agent.devtools.simulate.routes import router as simulations_router
from cvi_agent.llm.routes import router as llm_router
from cvi_agent.llm.tools import validate_persona_tools
from cvi_agent.metrics import router as metrics_router
from cvi_agent.personas import Persona, PersonaError, load_personas
from cvi_agent.runtime import Runtime
from cvi_agent.videos.lifespan import start_videos
from cvi_agent.videos.tool import validate_video_tools
from cvi_agent.videos.webhooks import router as videos_router
from cvi_agent.web.http import install_error_handlers
from cvi_agent.web.security import install_security


def load_checked_personas(settings: Settings) -> dict[str, Persona]:
    personas = load_personas(settings.personas_dir)
    problems = [p for persona in personas.values() for p in validate_persona_tools(persona)]
    problems += [p for persona in personas.values() for p in validate_video_tools(persona)]
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
        memory = start_memory_reporter()  # CVI_TRACEMALLOC: diagnostics, off by default
        runtime = await Runtime.start(settings, personas)
        app.state.runtime = runtime
        videos = await start_videos(runtime)
        if runtime.record is not None:  # ready videos reach the conversation's bot via the bus
            videos.service.publish = runtime.record.announce
        try:
            yield
        finally:
            simulations = runtime.extras.get("simulations")
            if simulations is not None:
                await simulations.aclose()
            await videos.aclose()
            await runtime.aclose()
            if memory is not None:
                await memory.aclose()

    app = FastAPI(
        title="cvi-agent",
        version=__version__,
        summary="Custom LLM backend, live orchestration and callback ingestion for Tavus CVI.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_security(app, settings)  # API keys, per-key rate limit, CORS (security.py)
    app.include_router(llm_router)
    app.include_router(callbacks_router)
    app.include_router(api_router)
    app.include_router(videos_router)
    app.include_router(simulations_router)
    app.include_router(metrics_router)

    console_dir = Path(__file__).parent / "web" / "console"
    app.mount("/console", StaticFiles(directory=console_dir), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(console_dir / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness", tags=["ops"])
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "personas": len(personas)}

    return app
