"""The safety net: poll pending videos until they are ready or failed.

Webhooks are the fast path, but Argil documents no retries, a webhook may not be configured
(no `CVI_CALLBACK_TOKEN`, no registered endpoint, a public URL the provider cannot reach), and
an Argil success that could not be confirmed is left `rendering`. So every pending video of a
configured provider is polled, each on its own backoff (interval, doubling up to
`max_interval`), a few at a time (`concurrency`). A video still pending after `max_age` is
marked failed ("no result after …"); a late webhook can still turn it ready.

Several server processes each run a poller: that only repeats idempotent GETs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cvi_agent.store import VideoRecord
from cvi_agent.videos.base import PENDING, ProviderError, VideoEvent
from cvi_agent.videos.service import VideoService

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Schedule:
    next_at: float
    delay: float


class VideoPoller:
    def __init__(
        self,
        service: VideoService,
        *,
        interval: float = 15.0,
        max_interval: float = 300.0,
        max_age: float = 6 * 3600.0,
        concurrency: int = 4,
        batch: int = 200,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.service = service
        self.interval = interval
        self.max_interval = max(interval, max_interval)
        self.max_age = max_age
        self.batch = batch
        self._clock = clock
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._schedule: dict[tuple[str, str], _Schedule] = {}
        self._task: asyncio.Task[None] | None = None
        self.polls = 0  # provider GETs made (for tests and metrics)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="video-poller")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("video poller: scan failed")
            await asyncio.sleep(self.interval)

    async def poll_once(self) -> int:
        """One scan: poll every pending video that is due. Returns how many were polled."""
        configured = set(self.service.configured())
        if not configured:
            return 0
        pending = await self.service.store.list_videos(statuses=PENDING, limit=self.batch)
        now = self._clock()
        live = {(v.provider, v.video_id) for v in pending}
        for key in list(self._schedule):
            if key not in live:
                del self._schedule[key]
        due: list[VideoRecord] = []
        for video in pending:
            if video.provider not in configured:
                continue
            key = (video.provider, video.video_id)
            slot = self._schedule.setdefault(key, _Schedule(now, self.interval))
            if slot.next_at <= now:
                due.append(video)
        if due:
            await asyncio.gather(*(self._poll(video, now) for video in due))
        return len(due)

    async def _poll(self, video: VideoRecord, now: float) -> None:
        key = (video.provider, video.video_id)
        slot = self._schedule[key]
        slot.next_at = now + slot.delay
        slot.delay = min(slot.delay * 2, self.max_interval)
        async with self._semaphore:
            if now - video.created_at > self.max_age:
                await self._give_up(video)
                return
            try:
                self.polls += 1
                current = await self.service.refresh(video.provider, video.video_id)
            except ProviderError as exc:
                log.warning(
                    "video poller: %s/%s: %s (next try in %.0fs)",
                    video.provider,
                    video.video_id,
                    exc,
                    slot.next_at - now,
                )
                return
        if current.status not in PENDING:
            self._schedule.pop(key, None)
            log.info("video poller: %s/%s is %s", video.provider, video.video_id, current.status)

    async def _give_up(self, video: VideoRecord) -> None:
        age = _duration(self.max_age)
        await self.service.record(
            VideoEvent(
                video.provider,
                video.video_id,
                "failed",
                error=f"no result from {video.provider} after {age}",
                conversation_id=video.conversation_id,
                kind="video.timed_out",
            ),
            f"{video.provider}:timed_out:{video.video_id}",
        )
        self._schedule.pop((video.provider, video.video_id), None)
        log.warning("video poller: %s/%s: gave up after %s", video.provider, video.video_id, age)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        value, unit = seconds / 3600, "hour"
    elif seconds >= 60:
        value, unit = seconds / 60, "minute"
    else:
        value, unit = seconds, "second"
    return f"{value:g} {unit}{'' if value == 1 else 's'}"
