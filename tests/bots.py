"""A test-only bot for API tests that need a bot but no room (`CVI_BOT_FACTORY`)."""

from __future__ import annotations

import asyncio
import time
import uuid

from cvi_agent.bot.worker import BotSpec
from cvi_agent.protocol.interactions import Interaction
from cvi_agent.store import EventRecord

# Every bot built in this process, by conversation id (the in-process server shares it).
BOTS: dict[str, list[RecordingBot]] = {}


class RecordingBot:
    def __init__(self, spec: BotSpec) -> None:
        self.spec = spec
        self.sent: list[Interaction] = []
        self.started = asyncio.Event()
        self.stopped: str | None = None
        self._done = asyncio.Event()
        self.fail_sends = False

    async def start(self, url: str, meeting_token: str | None = None) -> None:
        self.url = url
        self.started.set()

    async def send(self, interaction: Interaction) -> None:
        if self.fail_sends:
            raise RuntimeError("ChannelNotOpen")
        self.sent.append(interaction)
        # Recorded as the real ConversationBot records what it sends.
        message = interaction.to_message(self.spec.conversation_id)
        event = EventRecord(
            conversation_id=self.spec.conversation_id,
            source="bot",
            kind="interaction." + message["event_type"],
            dedupe_key=uuid.uuid4().hex,
            payload=message,
            occurred_at=time.time(),
        )
        for new in await self.spec.store.add_events([event]):
            await self.spec.on_record(new)

    async def run(self) -> str:
        await self._done.wait()
        return self.stopped or "finished"

    async def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
        self._done.set()


def recording_bot(spec: BotSpec) -> RecordingBot:
    bot = RecordingBot(spec)
    BOTS.setdefault(spec.conversation_id, []).append(bot)
    return bot
