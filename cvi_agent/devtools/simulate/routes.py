"""`POST /api/simulations`: the console's "start a simulated conversation" button.

The server runs the simulation against itself (over loopback), so a developer sees a whole
conversation in the console with nothing but the server running. What only the simulated Tavus
measures (each turn's time to first token and utterance-to-utterance as the caller experienced
them) and when the script is done are stored as the conversation's `simulation` events, so the
console can chart them and say it is waiting for the end-of-call callbacks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cvi_agent.config import Settings
from cvi_agent.conversations.deps import conversations_of
from cvi_agent.devtools.simulate.engine import Notify, Simulation
from cvi_agent.devtools.simulate.report import SimulationReport
from cvi_agent.devtools.simulate.script import load_script
from cvi_agent.personas import Persona
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.store import EventRecord
from cvi_agent.web.auth import presented_key, require_key
from cvi_agent.web.body import read_json_object
from cvi_agent.web.errors import ApiError, validation_message

log = logging.getLogger(__name__)


class RoomHost:
    """A LocalRoomServer started on first use and kept for the process (the server's simulations).

    One room server serves every simulation of the process, and none is started until the
    button is pressed; the app's lifespan calls `aclose` so no simulation outlives the server.
    """

    def __init__(self) -> None:
        self.server: LocalRoomServer | None = None
        self._lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[SimulationReport]] = set()

    async def get(self) -> LocalRoomServer:
        """The room server, started by the first caller (the lock keeps it to one)."""
        async with self._lock:
            if self.server is None:
                self.server = await LocalRoomServer("127.0.0.1", 0).start()
            return self.server

    async def aclose(self) -> None:
        """Cancel the running simulations and stop the room server, at the app's shutdown."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.close()
            self.server = None


def milestones(request: Request, conversation_id: str) -> Notify | None:
    """Store a simulation's milestones as `simulation` events of its conversation (and publish
    them on its live feed), or None when the app runs no conversation record."""
    service = conversations_of(request.app.state)
    if service is None:
        return None
    counter = itertools.count(1)

    async def notify(kind: str, payload: dict[str, Any]) -> None:
        record = EventRecord(
            conversation_id=conversation_id,
            source="simulation",
            kind=kind,
            dedupe_key=f"{conversation_id}:{next(counter)}",
            payload=payload,
        )
        await service.add_events([record])

    return notify


router = APIRouter(prefix="/api/simulations", tags=["simulations"])
MAX_SIMULATIONS = 5


class StartSimulation(BaseModel):
    """The request body; every field is optional so the button can send nothing."""

    model_config = ConfigDict(extra="forbid")
    persona: str | None = Field(default=None, description="default: the script's persona")
    linger: float = Field(
        default=90.0, ge=0, le=600, description="seconds to stay for interactions"
    )
    words_per_second: float | None = Field(default=None, gt=0, le=1000)


@router.post(
    "",
    status_code=202,
    dependencies=[Depends(require_key)],
    summary="Start a simulated conversation",
)
async def start_simulation(request: Request) -> JSONResponse:
    """Start the shipped script in the background and answer at once with its conversation id.

    The reply comes before the simulation ends (202) so the console can open the conversation's
    live feed and watch it; at most `MAX_SIMULATIONS` run at a time (429 beyond). The bot
    meets the simulated replica in a local room, so `CVI_LOCAL_ROOMS` must allow them (400
    `local_rooms_off` otherwise; `make run` turns them on).
    """
    settings: Settings = request.app.state.settings
    personas: dict[str, Persona] = request.app.state.personas
    raw = (
        await read_json_object(request, 64 * 1024)
        if request.headers.get("content-length") not in (None, "0")
        else {}
    )
    try:
        body = StartSimulation.model_validate(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise ApiError(400, message, "invalid_request", param) from None
    if not settings.local_rooms:
        raise ApiError(
            400,
            "A simulated conversation meets in a local room on this machine, and local rooms "
            "are off: set CVI_LOCAL_ROOMS=1 to allow them.",
            "local_rooms_off",
        )
    script = load_script()
    updates: dict[str, Any] = {}
    if body.persona is not None:
        updates["persona"] = body.persona
    if body.words_per_second is not None:
        updates["words_per_second"] = body.words_per_second
    script = script.model_copy(update=updates)
    persona = personas.get(script.persona)
    if persona is None:
        raise ApiError(404, f"No persona {script.persona!r}.", "persona_not_found", "persona")
    host: RoomHost = request.app.state.simulations
    if len(host.tasks) >= MAX_SIMULATIONS:
        raise ApiError(
            429,
            f"{MAX_SIMULATIONS} simulations are already running.",
            "too_many_simulations",
            headers={"Retry-After": "30"},
        )
    rooms = await host.get()
    server = request.scope.get("server") or ("127.0.0.1", settings.port)
    bind = server[0] if server[0] not in ("0.0.0.0", "::", "") else "127.0.0.1"
    key = presented_key(request.headers) or ""
    tokens = settings.callback_tokens
    conversation_id = "sim-" + secrets.token_hex(5)
    simulation = Simulation(
        server_url=f"http://{bind}:{server[1]}",
        api_key=key,
        callback_token=tokens[0] if tokens else None,
        room_url=rooms.room_url(conversation_id),
        script=script,
        persona_name=persona.persona_name,
        system_prompt=" ".join(p for p in (persona.system_prompt, persona.context) if p),
        tools=[t.openai_tool() for t in persona.client_tools()],
        conversation_id=conversation_id,
        printer=lambda line: log.info("simulation %s: %s", conversation_id, line.strip()),
        linger=body.linger,
        notify=milestones(request, conversation_id),
    )
    task = asyncio.create_task(simulation.run())
    host.tasks.add(task)
    task.add_done_callback(host.tasks.discard)
    return JSONResponse(
        {"conversation_id": conversation_id, "persona": script.persona, "linger": body.linger},
        status_code=202,
    )
