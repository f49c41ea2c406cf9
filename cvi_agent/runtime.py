"""The long-lived services one server process shares, built once in the app's lifespan."""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass

from starlette.datastructures import State

from cvi_agent import metrics
from cvi_agent.config import Settings
from cvi_agent.conversations.service import ConversationService
from cvi_agent.llm.forwarding import accept_forwarded
from cvi_agent.llm.service import ChatService
from cvi_agent.llm.tools import validate_persona_tools
from cvi_agent.personas import Persona, PersonaError, load_personas
from cvi_agent.store import SqlStore
from cvi_agent.videos.lifespan import start_videos
from cvi_agent.videos.poller import VideoPoller
from cvi_agent.videos.service import VideoService
from cvi_agent.videos.tool import validate_video_tools


def load_checked_personas(settings: Settings) -> dict[str, Persona]:
    """The persona files of `settings.personas_dir`, with every tool they declare checked
    (server-tool handlers importable, video tools configured); `PersonaError` lists every
    problem at once."""
    personas = load_personas(settings.personas_dir)
    problems = [p for persona in personas.values() for p in validate_persona_tools(persona)]
    problems += [p for persona in personas.values() for p in validate_video_tools(persona)]
    if problems:
        raise PersonaError("\n".join(problems))
    return personas


@dataclass
class Runtime:
    """Every service of one server process, each a typed field.

    Built by `Runtime.start` in the app's lifespan and closed by `aclose`; `install` puts the
    services the routers use on `app.state` (`chat`, `conversations`, `videos`), so no router
    needs to know this class.
    """

    settings: Settings
    personas: dict[str, Persona]
    store: SqlStore
    conversations: ConversationService
    chat: ChatService
    videos: VideoService
    video_poller: VideoPoller | None = None

    @classmethod
    async def start(cls, settings: Settings, personas: dict[str, Persona]) -> Runtime:
        """Open every shared resource (the store runs its migrations here)."""
        store = SqlStore(settings.database_url)
        await store.init()
        conversations = await ConversationService.start(settings, store, personas)
        chat = ChatService.start(settings, personas, recorder=conversations.turns)
        await chat.turns.start(functools.partial(accept_forwarded, chat))  # other processes' turns
        videos, poller = await start_videos(settings, store)
        videos.publish = conversations.announce  # ready videos reach the conversation's bot
        chat.tool_services = {"videos": videos}  # for the video tools' handlers
        tune_gc()
        return cls(settings, personas, store, conversations, chat, videos, poller)

    def install(self, state: State) -> None:
        """Expose the services the routers use on the app's state."""
        state.runtime = self
        state.chat = self.chat
        state.conversations = self.conversations
        state.videos = self.videos

    async def aclose(self) -> None:
        """Stop in dependency order: videos, open turns (which still record), the conversation
        service (worker, turn recorder, bus), then the database."""
        if self.video_poller is not None:
            await self.video_poller.aclose()
        await self.videos.aclose()
        await self.chat.aclose()
        await self.conversations.aclose()
        await self.store.aclose()
        metrics.process_exiting()


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
