"""What the room tests share: a listener that records everything a room reports, and a
`LocalRoom` wired to one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from cvi_agent.rooms.base import Participant, RoomListener
from cvi_agent.rooms.local import LocalRoom


class Recorder(RoomListener):
    def __init__(self) -> None:
        self.messages: list[tuple[Any, str | None]] = []
        self.joined: list[Participant] = []
        self.left: list[tuple[Participant, str | None]] = []
        self.disconnects: list[tuple[str, bool]] = []
        self.reconnects = 0
        self.threads: set[int] = set()
        self.changed = asyncio.Event()

    def _note(self) -> None:
        self.threads.add(threading.get_ident())
        self.changed.set()

    def on_app_message(self, message: Any, sender: str | None) -> None:
        self.messages.append((message, sender))
        self._note()

    def on_participant_joined(self, participant: Participant) -> None:
        self.joined.append(participant)
        self._note()

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        self.left.append((participant, reason))
        self._note()

    def on_disconnected(self, reason: str, permanent: bool) -> None:
        self.disconnects.append((reason, permanent))
        self._note()

    def on_reconnected(self) -> None:
        self.reconnects += 1
        self._note()

    async def until(self, condition: Any, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def local(name: str, **options: Any) -> tuple[LocalRoom, Recorder]:
    room = LocalRoom(user_name=name, **options)
    listener = Recorder()
    room.listener = listener
    return room, listener
