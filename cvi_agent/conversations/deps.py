"""How the conversation routes reach the process's services (set on `app.state` by the app)."""

from __future__ import annotations

from starlette.datastructures import State

from cvi_agent.conversations.service import ConversationService
from cvi_agent.videos.service import VideoService
from cvi_agent.web.errors import ApiError


def conversations_of(state: State) -> ConversationService | None:
    """The service, or None while the app has not started (or has stopped)."""
    service: ConversationService | None = getattr(state, "conversations", None)
    return service


def require_conversations(state: State) -> ConversationService:
    """The service, or a 503 the caller can retry while the app is starting."""
    service = conversations_of(state)
    if service is None:
        raise ApiError(503, "The conversation record is not running.", "not_ready")
    return service


def videos_of(state: State) -> VideoService | None:
    """The avatar-video service, when the app runs one."""
    service: VideoService | None = getattr(state, "videos", None)
    return service
