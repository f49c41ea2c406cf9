"""Telling a live conversation that its video is ready (persona option `on_ready`).

`announce_video_ready` decides what to say and hands an Interactions-Protocol command to a
publisher. The room bot and the event bus are built elsewhere; the hook is
`VideoService.publish` (an `async (conversation_id, Interaction) -> None`): whoever owns the bus
sets it at startup, and the bot sends the interaction into the room. Without a publisher the
command is still recorded (an event row `video.announce` with the exact app-message), so the
record shows it and a bot that reads the feed can pick it up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from cvi_agent.llm.brains.speech import render
from cvi_agent.protocol.interactions import AppendContext, Echo, Interaction
from cvi_agent.store import EventRecord, SqlStore, VideoRecord

log = logging.getLogger(__name__)

OnReady = Literal["echo", "append_context", "none"]
ON_READY: tuple[OnReady, ...] = ("echo", "append_context", "none")
DEFAULT_ON_READY: OnReady = "append_context"
DEFAULT_READY_TEXT = "Good news: the video you asked for is ready."
DEFAULT_READY_CONTEXT = (
    "The video the user asked for ({title}) is now ready at {url}. Let the user know at a "
    "natural moment; do not read the link aloud."
)
ENDED_STATUSES = frozenset({"ended", "shutdown", "failed", "error"})

Publisher = Callable[[str, Interaction], Awaitable[None]]

# Key under VideoRecord.raw where we keep what the creator asked for (persona, on_ready, title).
META_KEY = "_cvi"


def video_meta(video: VideoRecord) -> dict[str, Any]:
    meta = video.raw.get(META_KEY)
    return dict(meta) if isinstance(meta, dict) else {}


def ready_interaction(video: VideoRecord) -> Interaction | None:
    """The command for a ready video, from the options stored with it; None for `none`."""
    meta = video_meta(video)
    on_ready = meta.get("on_ready") or "none"
    variables = {
        "title": meta.get("title") or "your video",
        "url": video.url or "",
        "provider": video.provider,
        "video_id": video.video_id,
    }
    if on_ready == "echo":
        text = render(str(meta.get("ready_text") or DEFAULT_READY_TEXT), variables).strip()
        return Echo(text=text) if text else None
    if on_ready == "append_context":
        context = render(str(meta.get("ready_context") or DEFAULT_READY_CONTEXT), variables)
        return AppendContext(context=context.strip()) if context.strip() else None
    return None


async def announce_video_ready(
    store: SqlStore, video: VideoRecord, *, publish: Publisher | None = None
) -> Interaction | None:
    """Announce a ready video to its conversation, at most once. Never raises.

    Skipped when the video has no conversation, its persona chose `none`, or the conversation
    is known to have ended. The once-only guard is the event row `announce:{provider}:{id}`
    (unique in the store), so concurrent webhook and poller paths cannot both announce.
    Returns the interaction that was announced, or None.
    """
    try:
        if video.status != "ready" or not video.conversation_id:
            return None
        interaction = ready_interaction(video)
        if interaction is None:
            return None
        conversation = await store.get_conversation(video.conversation_id)
        if conversation is not None and (
            conversation.ended_at is not None or conversation.status in ENDED_STATUSES
        ):
            log.info(
                "video %s/%s ready after conversation %s ended: not announced",
                video.provider,
                video.video_id,
                video.conversation_id,
            )
            return None
        row = EventRecord(
            conversation_id=video.conversation_id,
            source="video",
            kind="video.announce",
            dedupe_key=f"announce:{video.provider}:{video.video_id}",
            payload={
                "interaction": interaction.model_dump(exclude={"event_type"}),
                "message": interaction.to_message(video.conversation_id),
                "video": video.as_dict(),
            },
        )
        if not await store.add_events([row]):
            return None
        if publish is not None:
            await publish(video.conversation_id, interaction)
        return interaction
    except Exception:
        log.exception("announcing video %s/%s failed", video.provider, video.video_id)
        return None
