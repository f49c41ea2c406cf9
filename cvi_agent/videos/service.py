"""The video service: provider clients from settings, and recording what they say.

One `VideoService` per process (built in the app lifespan, kept as `Runtime.videos` and `app.state.videos`;
the CLI builds its own). Every path that learns something about a video — creation, a webhook,
the poller, the CLI — goes through `record_video_event`: an `events` row (source `video`,
deduplicated per delivery) and a monotonic `upsert_video`, then at most one announcement when
the video becomes ready.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cvi_agent.config import Settings
from cvi_agent.store import EventRecord, SqlStore, VideoRecord
from cvi_agent.videos.announce import META_KEY, Publisher, announce_video_ready
from cvi_agent.videos.argil import ArgilVideos
from cvi_agent.videos.base import (
    PROVIDERS,
    CreateVideo,
    ProviderError,
    ProviderNotConfigured,
    RetryPolicy,
    VideoEvent,
    VideoProvider,
)
from cvi_agent.videos.jogg import JoggVideos
from cvi_agent.videos.tavus import TavusVideos

log = logging.getLogger(__name__)

JOGG_SECRET_FILE = "jogg-webhook-secret"

Announcer = Callable[[VideoRecord], Awaitable[Any]]


def jogg_secret_path(settings: Settings) -> Path:
    return settings.var_dir / JOGG_SECRET_FILE


def jogg_secrets(settings: Settings) -> tuple[str, ...]:
    """Secrets accepted on signed JoggAI deliveries: `JOGG_WEBHOOK_SECRET` and the stored one.

    Both are accepted so a re-registration (new secret in the file) and an environment value
    can overlap while deliveries signed with either are in flight.
    """
    found = [settings.jogg_webhook_secret.strip()]
    path = jogg_secret_path(settings)
    try:
        found.append(path.read_text().strip())
    except OSError:
        pass
    return tuple(dict.fromkeys(s for s in found if s))


def write_secret(path: Path, secret: str) -> None:
    """Write a secret readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def provider_key(settings: Settings, name: str) -> tuple[str, str]:
    """(api key, base URL) of a provider from the settings."""
    if name == "tavus":
        return settings.tavus_api_key, settings.tavus_api_url
    if name == "argil":
        return settings.argil_api_key, settings.argil_api_url
    if name == "jogg":
        return settings.jogg_api_key, settings.jogg_api_url
    raise ProviderError(name, f"unknown video provider {name!r} (known: {', '.join(PROVIDERS)})")


def build_provider(
    name: str, settings: Settings, *, timeout: float = 15.0, retry: RetryPolicy | None = None
) -> VideoProvider:
    key, url = provider_key(settings, name)
    env = {"tavus": "TAVUS_API_KEY", "argil": "ARGIL_API_KEY", "jogg": "JOGG_API_KEY"}[name]
    if not key:
        raise ProviderNotConfigured(name, f"no API key: set {env}")
    if name == "tavus":
        return TavusVideos(key, url, timeout=timeout, retry=retry)
    if name == "argil":
        return ArgilVideos(key, url, timeout=timeout, retry=retry)
    return JoggVideos(key, url, timeout=timeout, retry=retry)


@dataclass(slots=True)
class Recorded:
    """What recording one event did: whether its row was new, and the video as now stored."""

    new: bool
    video: VideoRecord
    became_ready: bool


def event_row(
    event: VideoEvent, dedupe_key: str, conversation_id: str | None, **extra: Any
) -> EventRecord:
    """The `events` row of one thing a provider said (payload: normalized fields + raw)."""
    payload = {**event.as_dict(), "conversation_id": conversation_id, "raw": event.raw, **extra}
    return EventRecord(
        conversation_id=conversation_id or "",
        source="video",
        kind=event.kind,
        dedupe_key=dedupe_key,
        payload=payload,
        occurred_at=event.occurred_at,
    )


async def apply_video_event(
    store: SqlStore,
    event: VideoEvent,
    *,
    prior: VideoRecord | None,
    script: str | None = None,
    meta: Mapping[str, Any] | None = None,
    announce: Announcer | None = None,
) -> tuple[VideoRecord, bool]:
    """Advance the video row (never backwards); announce when it just became ready."""
    raw: dict[str, Any] = {"provider": event.raw}
    if meta:
        raw[META_KEY] = dict(meta)
    video = await store.upsert_video(
        VideoRecord(
            provider=event.provider,
            video_id=event.video_id,
            status=event.status,
            conversation_id=event.conversation_id or (prior.conversation_id if prior else None),
            url=event.url,
            error=event.error,
            script=script,
            raw=raw,
        )
    )
    became_ready = video.status == "ready" and (prior is None or prior.status != "ready")
    if became_ready:
        await (announce or (lambda v: announce_video_ready(store, v)))(video)
    return video, became_ready


async def record_video_event(
    store: SqlStore,
    event: VideoEvent,
    dedupe_key: str,
    *,
    script: str | None = None,
    meta: Mapping[str, Any] | None = None,
    announce: Announcer | None = None,
) -> Recorded:
    """Store one event (row deduplicated on `dedupe_key`) and apply it to the video.

    The video is updated even when the row is a duplicate: a redelivery after a crash between
    the two writes then completes the job, and applying the same status twice changes nothing.
    """
    prior = await store.get_video(event.provider, event.video_id)
    conversation_id = event.conversation_id or (prior.conversation_id if prior else None)
    event.conversation_id = conversation_id
    inserted = await store.add_events([event_row(event, dedupe_key, conversation_id)])
    video, became_ready = await apply_video_event(
        store, event, prior=prior, script=script, meta=meta, announce=announce
    )
    return Recorded(bool(inserted), video, became_ready)


class VideoService:
    """Provider clients (built lazily from settings) and the store, for one process."""

    def __init__(
        self,
        settings: Settings,
        store: SqlStore,
        providers: Mapping[str, VideoProvider] | None = None,
        *,
        publish: Publisher | None = None,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # The hook for live announcements; see announce.py. Set by whoever owns the bus.
        self.publish = publish
        self._providers: dict[str, VideoProvider] = dict(providers or {})
        self._timeout = timeout
        self._retry = retry

    def is_configured(self, name: str) -> bool:
        if name in self._providers:
            return True
        try:
            return bool(provider_key(self.settings, name)[0])
        except ProviderError:
            return False

    def configured(self) -> list[str]:
        return [name for name in PROVIDERS if self.is_configured(name)]

    def provider(self, name: str) -> VideoProvider:
        """The client for `name`; ProviderNotConfigured (a ProviderError) without a key."""
        client = self._providers.get(name)
        if client is None:
            client = build_provider(name, self.settings, timeout=self._timeout, retry=self._retry)
            self._providers[name] = client
        return client

    async def aclose(self) -> None:
        for client in self._providers.values():
            await client.aclose()
        self._providers.clear()

    # -- where providers call us back -----------------------------------------------------------

    def callback_url(self, name: str) -> str | None:
        """The per-request webhook URL for `name` (Tavus, JoggAI), or None.

        None without `CVI_CALLBACK_TOKEN` (we never hand out an unauthenticated URL; the
        poller finishes the job instead) and for Argil, whose webhooks are per account.
        """
        tokens = self.settings.callback_tokens  # a comma list to rotate: the first is current
        if not tokens or name == "argil":
            return None
        base = self.settings.public_url.rstrip("/")
        return f"{base}/callbacks/{name}?token={quote(tokens[0], safe='')}"

    def account_webhook_url(self, name: str) -> str:
        """The URL an account-level webhook (Argil, JoggAI) points at."""
        base = self.settings.public_url.rstrip("/")
        if name == "argil":
            tokens = self.settings.callback_tokens
            if not tokens:
                raise ProviderError(
                    name, "set CVI_CALLBACK_TOKEN first: Argil webhooks carry it in the URL"
                )
            return f"{base}/callbacks/argil?token={quote(tokens[0], safe='')}"
        if name == "jogg":
            return f"{base}/callbacks/jogg"
        raise ProviderError(name, "has no account-level webhooks (it calls back per request)")

    def jogg_secrets(self) -> tuple[str, ...]:
        return jogg_secrets(self.settings)

    # -- creating, refreshing, recording ---------------------------------------------------------

    async def announce(self, video: VideoRecord) -> Any:
        return await announce_video_ready(self.store, video, publish=self.publish)

    async def record(
        self,
        event: VideoEvent,
        dedupe_key: str | None = None,
        *,
        script: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Recorded:
        key = dedupe_key or f"{event.provider}:{event.kind}:{event.video_id}:{event.status}"
        return await record_video_event(
            self.store, event, key, script=script, meta=meta, announce=self.announce
        )

    async def create(
        self,
        provider: str,
        *,
        avatar: str,
        script: str | None = None,
        audio_url: str | None = None,
        voice: str | None = None,
        title: str | None = None,
        conversation_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> VideoRecord:
        """Create a video and record it (status `queued`, or `rendering` once started)."""
        client = self.provider(provider)
        request = CreateVideo(
            avatar=avatar,
            script=script,
            audio_url=audio_url,
            voice=voice,
            title=title,
            conversation_id=conversation_id,
            callback_url=self.callback_url(provider),
            extra=dict(extra or {}),
        )
        stored_meta = {"title": title, **(meta or {})}
        try:
            event = await client.create_video(request)
        except ProviderError as exc:
            if exc.video_id:
                # The provider holds a video we could not start: keep it in the record.
                await self.record(
                    VideoEvent(
                        provider,
                        exc.video_id,
                        "failed",
                        error=str(exc),
                        conversation_id=conversation_id,
                        kind="video.created",
                    ),
                    script=script,
                    meta=stored_meta,
                )
            raise
        event.conversation_id = event.conversation_id or conversation_id
        recorded = await self.record(
            event, f"{provider}:created:{event.video_id}", script=script, meta=stored_meta
        )
        log.info(
            "video %s/%s created (%s) for conversation %s",
            provider,
            event.video_id,
            recorded.video.status,
            conversation_id,
        )
        return recorded.video

    async def refresh(self, provider: str, video_id: str) -> VideoRecord:
        """Ask the provider for the video's status now, and record it."""
        event = await self.provider(provider).get_video(video_id)
        recorded = await self.record(event, f"{provider}:status:{video_id}:{event.status}")
        return recorded.video
