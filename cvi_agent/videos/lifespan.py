"""Wiring for the app lifespan: one VideoService and its poller per server process."""

from __future__ import annotations

import logging

from cvi_agent.config import mask_key
from cvi_agent.runtime import Runtime
from cvi_agent.videos.poller import VideoPoller
from cvi_agent.videos.service import VideoService, provider_key

log = logging.getLogger(__name__)


class VideosRunning:
    """What `start_videos` started; `aclose()` stops the poller and closes the clients."""

    def __init__(self, service: VideoService, poller: VideoPoller | None) -> None:
        self.service = service
        self.poller = poller

    async def aclose(self) -> None:
        if self.poller is not None:
            await self.poller.aclose()
        await self.service.aclose()


async def start_videos(runtime: Runtime) -> VideosRunning:
    """Build the service (kept in `runtime.extras["videos"]`) and start the poller.

    `CVI_VIDEO_POLL_INTERVAL=0` turns the poller off (e.g. when a separate process polls).
    """
    settings = runtime.settings
    service = VideoService(settings, runtime.store)
    runtime.extras["videos"] = service
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
    return VideosRunning(service, poller)
