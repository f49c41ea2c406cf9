"""Wiring for the app lifespan: one VideoService and its poller per server process."""

from __future__ import annotations

import logging

from cvi_agent.config import Settings, mask_key
from cvi_agent.store import SqlStore
from cvi_agent.videos.poller import VideoPoller
from cvi_agent.videos.service import VideoService, provider_key

log = logging.getLogger(__name__)


async def start_videos(
    settings: Settings, store: SqlStore
) -> tuple[VideoService, VideoPoller | None]:
    """Build the service and start its poller (None when `CVI_VIDEO_POLL_INTERVAL=0`, e.g.
    when a separate process polls). The caller closes both: the poller first."""
    service = VideoService(settings, store)
    poller = None
    if settings.video_poll_interval > 0:
        poller = VideoPoller(
            service, interval=settings.video_poll_interval, max_age=settings.video_poll_max_age
        )
        poller.start()
    configured = [
        f"{name} (key {mask_key(provider_key(settings, name)[0])})" for name in service.configured()
    ]
    log.info("video providers: %s", ", ".join(configured) if configured else "none configured")
    return service, poller
