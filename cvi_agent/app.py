"""FastAPI app factory: routers and lifespan wiring, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from cvi_agent import __version__
from cvi_agent.config import Settings
from cvi_agent.conversations.api import router as api_router
from cvi_agent.conversations.callbacks import router as callbacks_router
from cvi_agent.conversations.feed import router as feed_router
from cvi_agent.devtools.memdebug import start_from_env as start_memory_reporter
from cvi_agent.devtools.simulate.routes import RoomHost
from cvi_agent.devtools.simulate.routes import router as simulations_router
from cvi_agent.doctor.readiness import readiness
from cvi_agent.llm.routes import DIRECT_ENDPOINTS
from cvi_agent.llm.routes import router as llm_router
from cvi_agent.personas import Persona
from cvi_agent.runtime import Runtime, load_checked_personas
from cvi_agent.videos.webhooks import router as videos_router
from cvi_agent.web.direct import DirectRoutes
from cvi_agent.web.errors import install_error_handlers
from cvi_agent.web.logs import configured_secrets, install_log_filters
from cvi_agent.web.metrics import router as metrics_router
from cvi_agent.web.request_id import RequestId
from cvi_agent.web.security import install_security

CONSOLE_DIR = Path(__file__).parent / "web" / "console"


def create_app(
    settings: Settings | None = None, personas: dict[str, Persona] | None = None
) -> FastAPI:
    """The whole server: every router, the console, and a lifespan that starts the `Runtime`.

    `settings` default to the environment; `personas` default to the checked persona files of
    `settings.personas_dir`. `app.state` carries `settings` and `personas` from here on, and
    the runtime's services (`runtime`, `chat`, `conversations`, `videos`, `simulations`) while
    the app runs.
    """
    settings = settings or Settings()
    if personas is None:
        personas = load_checked_personas(settings)
    # Whoever configured logging (our commands, uvicorn's CLI), no secret in a line (web/logs.py).
    install_log_filters(*configured_secrets(settings, personas))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        memory = start_memory_reporter()  # CVI_TRACEMALLOC: diagnostics, off by default
        runtime = await Runtime.start(settings, personas)
        runtime.install(app.state)
        simulations = app.state.simulations = RoomHost()
        try:
            yield
        finally:
            await simulations.aclose()
            await runtime.aclose()
            if memory is not None:
                await memory.aclose()

    app = FastAPI(
        title="cvi-agent",
        version=__version__,
        summary="Custom LLM backend, live orchestration and callback ingestion for Tavus CVI.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.personas = personas
    install_error_handlers(app)
    # Innermost: the chat route as plain ASGI, beside FastAPI's routing (web/direct.py).
    app.add_middleware(DirectRoutes, endpoints=DIRECT_ENDPOINTS)
    install_security(app, settings)  # API keys, per-key rate limit, CORS (web/security.py)
    app.add_middleware(RequestId)  # outermost: refusals and preflights carry x-request-id too
    app.include_router(llm_router)
    app.include_router(callbacks_router)
    app.include_router(api_router)
    app.include_router(feed_router)
    app.include_router(videos_router)
    app.include_router(simulations_router)
    app.include_router(metrics_router)

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # browsers ask for it whatever the page links
        return FileResponse(CONSOLE_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/healthz", summary="Liveness", tags=["ops"])
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "personas": len(personas)}

    @app.get(
        "/readyz",
        summary="Readiness: the database (and Redis when configured) answer",
        tags=["ops"],
        responses={503: {"description": "a part is failing; the body says which and why"}},
    )
    async def readyz() -> JSONResponse:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        ready, parts = await readiness(
            runtime.store if runtime else None,
            runtime.conversations.bus if runtime else None,
        )
        body = {"status": "ready" if ready else "not ready", **parts}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app
