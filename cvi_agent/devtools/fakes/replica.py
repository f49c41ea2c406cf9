"""A scripted stand-in for Tavus's side of a room: a `LocalRoom` participant that speaks the
Tavus event format (TAVUS_PROTOCOL §3) and keeps every app-message it receives, as received.

Used by the bot tests and for local demos:

    python -m cvi_agent.devtools.fakes.replica ws://127.0.0.1:8765/demo [--script events.jsonl]

With no script it plays a short built-in conversation as the replica, with a human ("Alice")
who leaves at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvi_agent.rooms.base import Participant, RoomListener
from cvi_agent.rooms.local import LocalRoom

Predicate = Callable[[Any], bool]


class _Inbox(RoomListener):
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.joined: list[Participant] = []
        self.left: list[Participant] = []
        self.changed = asyncio.Event()

    def on_app_message(self, message: Any, sender: str | None) -> None:
        self.messages.append(message)
        self.changed.set()

    def on_participant_joined(self, participant: Participant) -> None:
        self.joined.append(participant)
        self.changed.set()

    def on_participant_left(self, participant: Participant, reason: str | None) -> None:
        self.left.append(participant)
        self.changed.set()


class ScriptedPeer:
    """One participant that sends Tavus events with increasing `seq`. The bot takes it for the
    replica when `user_name` is the persona name or `user_id` contains `tavus-replica`."""

    def __init__(
        self,
        url: str,
        *,
        conversation_id: str = "c-demo",
        user_name: str = "Replica",
        user_id: str | None = None,
        seq_start: int = 1,
    ) -> None:
        self.url = url
        self.conversation_id = conversation_id
        self.room = LocalRoom(user_name=user_name, user_id=user_id, join_timeout=5.0)
        self.inbox = _Inbox()
        self.room.listener = self.inbox
        self.seq = seq_start - 1

    @property
    def received(self) -> list[Any]:
        return self.inbox.messages

    @property
    def id(self) -> str:
        local = self.room.local_participant
        return local.id if local is not None else ""

    async def join(self) -> ScriptedPeer:
        await self.room.join(self.url)
        return self

    async def leave(self) -> None:
        await self.room.leave()

    async def __aenter__(self) -> ScriptedPeer:
        return await self.join()

    async def __aexit__(self, *exc: object) -> None:
        await self.leave()

    def event(
        self,
        event_type: str,
        properties: dict[str, Any] | None = None,
        *,
        inference_id: str | None = None,
        turn_idx: int | None = None,
        seq: int | None = None,
        timestamp: float | None = None,
    ) -> dict[str, Any]:
        """A message in the Tavus format; `seq` counts up unless given."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        message: dict[str, Any] = {
            "message_type": "conversation",
            "event_type": event_type,
            "conversation_id": self.conversation_id,
        }
        if inference_id is not None:
            message["inference_id"] = inference_id
        message["seq"] = seq
        if turn_idx is not None:
            message["turn_idx"] = turn_idx
        message["timestamp"] = time.time() if timestamp is None else timestamp
        if properties is not None:
            message["properties"] = properties
        return message

    async def send(self, message: Any) -> None:
        """Send anything (a dict, a string, malformed data) as an app-message."""
        await self.room.send_app_message(message)

    async def say(
        self, event_type: str, properties: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        message = self.event(event_type, properties, **kw)
        await self.send(message)
        return message

    async def wait_for(self, predicate: Predicate, within: float = 5.0) -> Any:
        """The first received message matching `predicate` (waiting up to `within` seconds)."""
        seen = 0
        async with asyncio.timeout(within):
            while True:
                for message in self.received[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.received)
                self.inbox.changed.clear()
                await self.inbox.changed.wait()

    async def wait_until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.inbox.changed.clear()
                await self.inbox.changed.wait()


def event_type_is(name: str) -> Predicate:
    return lambda m: isinstance(m, dict) and m.get("event_type") == name


async def demo(
    url: str,
    script: Sequence[dict[str, Any]] | None,
    persona_name: str,
    delay: float,
    bot_name: str | None = "cvi-agent",
) -> int:
    """Play the built-in conversation (or `script`) against whatever bot is in the room."""
    replica = ScriptedPeer(url, user_name=persona_name, user_id="tavus-replica-demo")
    human = ScriptedPeer(url, user_name="Alice", user_id="user-alice")
    await human.join()
    await replica.join()
    print(f"peer: joined {url} as {persona_name!r} (replica) and 'Alice' (human)", flush=True)
    if bot_name:
        try:
            await replica.wait_until(
                lambda: any(p.user_name == bot_name for p in replica.room.participants().values()),
                within=30,
            )
        except TimeoutError:
            print(f"peer: no participant named {bot_name!r} joined within 30 s", file=sys.stderr)
            return 1
        print(f"peer: {bot_name!r} is in the room", flush=True)
    await asyncio.sleep(delay)
    if script is not None:
        for message in script:
            await replica.send(message)
            await asyncio.sleep(delay)
    else:
        turn = "turn-1"
        await replica.say("system.replica_joined", {})
        await replica.say("conversation.user.started_speaking", {}, turn_idx=1)
        await replica.say("conversation.started_speaking", {"role": "user"}, turn_idx=1)
        await replica.say(
            "conversation.utterance",
            {"role": "user", "speech": "What's the weather in Paris?"},
            inference_id=turn,
            turn_idx=1,
        )
        await asyncio.sleep(delay)
        await replica.say(
            "conversation.tool_call",
            {
                "name": "get_current_weather",
                "arguments": json.dumps({"location": "Paris"}),
                "tool_call_id": "call_demo_1",
            },
            inference_id=turn,
            turn_idx=1,
        )
        try:
            result = await replica.wait_for(
                lambda m: (
                    isinstance(m, dict)
                    and m.get("event_type") in ("conversation.tool_result", "conversation.echo")
                ),
                within=5,
            )
            print(f"peer: got {json.dumps(result)}", flush=True)
        except TimeoutError:
            print("peer: no tool result within 5 s (no persona with that client tool?)", flush=True)
        await replica.say(
            "conversation.utterance",
            {"role": "replica", "speech": "It's sunny in Paris today, about seventy degrees."},
            inference_id="reply-1",
            turn_idx=1,
        )
        await replica.say(
            "conversation.started_speaking", {"role": "replica"}, inference_id="reply-1"
        )
        await replica.say(
            "conversation.utterance.streaming",
            {
                "role": "replica",
                "speech": "It's sunny in Paris",
                "final": True,
                "is_interrupted": True,
            },
            inference_id="reply-1",
            turn_idx=1,
        )
        await replica.say(
            "conversation.stopped_speaking",
            {"role": "replica", "interrupted": True, "duration": 1.2},
            inference_id="reply-1",
        )
        await asyncio.sleep(delay)
    for message in replica.received:
        if isinstance(message, dict) and message.get("event_type") == "conversation.echo":
            print(f"peer: heard echo {message.get('properties', {}).get('text')!r}", flush=True)
    await human.leave()
    print("peer: Alice left", flush=True)
    await asyncio.sleep(delay)
    await replica.leave()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cvi_agent.devtools.fakes.replica", description=__doc__
    )
    parser.add_argument("url", help="ws:// LocalRoom URL (see `cvi-agent room serve`)")
    parser.add_argument("--script", type=Path, help="JSON lines: one Tavus event per line")
    parser.add_argument("--persona-name", default="Cora the Concierge")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds between steps")
    parser.add_argument(
        "--wait-for", default="cvi-agent", help="start once a participant with this name is in"
    )
    args = parser.parse_args(argv)
    script = None
    if args.script is not None:
        lines = args.script.read_text(encoding="utf-8").splitlines()
        script = [json.loads(line) for line in lines if line.strip()]
    try:
        return asyncio.run(demo(args.url, script, args.persona_name, args.delay, args.wait_for))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"peer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
