"""Avatar videos: Tavus, Argil and JoggAI behind one interface, their webhooks, a poller, and
the `create_video` server tool (registered when this package is imported)."""

from cvi_agent.videos import tool as _tool  # registers the create_video built-in
from cvi_agent.videos.base import (
    CreateVideo,
    Delivery,
    ProviderError,
    ProviderNotConfigured,
    VideoEvent,
    VideoProvider,
    VideoStatus,
)

__all__ = [
    "CreateVideo",
    "Delivery",
    "ProviderError",
    "ProviderNotConfigured",
    "VideoEvent",
    "VideoProvider",
    "VideoStatus",
]

del _tool
