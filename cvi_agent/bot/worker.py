"""Runs conversation bots: claims conversations through leases, one bot per conversation.

`cvi-agent worker` runs one `Worker`; `cvi-agent serve` runs one in-process too unless
`CVI_RUN_WORKER=0` (the default single-process mode just works). Any number of workers, on any
machines sharing the database, split the conversations between them:

- **claim**: a conversation wanting a bot has a lease row (offered by `POST /api/conversations`);
  a worker with spare capacity claims it (PostgreSQL: `FOR UPDATE SKIP LOCKED`), woken at once
  by a message on the bus's work channel, or by its poll (`CVI_WORKER_POLL_INTERVAL`).
- **heartbeat**: every third of `CVI_LEASE_SECONDS` the worker renews all its leases in one
  statement. A lease missing from the renewal was lost (taken over, or the conversation ended
  and the lease was removed): that bot is stopped at once.
- **takeover**: a worker that dies stops renewing; after the lease expires another worker
  claims it and starts a new bot in the same room.
- **commands**: each running bot listens on its conversation's command channel, so API calls
  in any web process reach it; every command is answered on its reply channel.
- **ending**: a bot that finishes (the humans left, or it was told to stop) removes its lease;
  one that crashes gives it back with a backoff, up to `MAX_ATTEMPTS` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from cvi_agent.bot.session import ConversationBot
from cvi_agent.bus import WORK_CHANNEL, Bus, Subscription, commands_channel
from cvi_agent.config import Settings
from cvi_agent.personas import Persona
from cvi_agent.protocol.interactions import Interaction, InteractionRequest
from cvi_agent.rooms.base import BaseRoom
from cvi_agent.rooms.daily import DailyRoom
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.policy import RoomPolicy, RoomRefused
from cvi_agent.store import EventRecord, Lease, Leases, SqlStore

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
OnRecord = Callable[[EventRecord], Awaitable[None]]


class Bot(Protocol):
    """What the worker needs of a bot (`cvi_agent.bot.session.ConversationBot`)."""

    async def start(self, url: str, meeting_token: str | None = None) -> None:
        """Join the room; raising counts as a failed attempt (retried with backoff)."""
        ...

    async def send(self, interaction: Interaction) -> None:
        """Send one interaction into the room; raising answers the command `send_failed`."""
        ...

    async def run(self) -> str:
        """Wait for the end, leave, and return why; a reason starting with `room lost` makes
        the worker retry the conversation (here or on another worker)."""
        ...

    async def stop(self, reason: str) -> None:
        """End the bot from another task; idempotent, and may race with `run`."""
        ...


@dataclass(slots=True)
class BotSpec:
    """What a bot factory gets to build the bot for one claimed conversation.

    Args:
        conversation_id: the conversation the lease is for.
        conversation_url: the room to join (a Daily `https://` URL, or `ws://` for a local
            room), from the lease.
        meeting_token: the room's meeting token, when the lease carries one.
        persona: the lease's (else the conversation's) persona, if this process knows it.
        bot_name: the bot's user name in the room.
        store: the worker's store, for the bot's records.
        on_record: the worker's publisher, awaited with each newly stored record.
    """

    conversation_id: str
    conversation_url: str
    meeting_token: str | None
    persona: Persona | None
    bot_name: str
    store: SqlStore
    on_record: OnRecord


BotFactory = Callable[[BotSpec], Bot]


def default_bot_factory(spec: BotSpec) -> Bot:
    """The real bot: a LocalRoom for `ws://`/`wss://` URLs (simulator, tests), else Daily."""
    local = spec.conversation_url.startswith(("ws://", "wss://"))
    room: BaseRoom = LocalRoom() if local else DailyRoom()
    bot: Bot = ConversationBot(
        room,
        conversation_id=spec.conversation_id,
        store=spec.store,
        persona=spec.persona,
        bot_name=spec.bot_name,
        on_record=spec.on_record,
    )
    return bot


def load_factory(path: str | None) -> BotFactory:
    """`package.module:function`, or the default factory."""
    if not path:
        return default_bot_factory
    module_name, _, attr = path.partition(":")
    factory: BotFactory = getattr(importlib.import_module(module_name), attr or "bot_factory")
    return factory


@dataclass
class RunningBot:
    """A bot this worker runs, with the lease that entitles it to.

    Args:
        lease: the lease held for it; its owner token is the fencing token, replaced when
            the worker re-claims its own expired lease.
        bot: the bot.
        task: the task running it (set as soon as it is created).
        stop_reason: why the worker stopped it (`lease_lost`, `worker_shutdown`,
            `worker_stopped`, or a stop command's reason); None while it should run. Decides
            what happens to the lease once the bot is gone.
        replies: recent command ids → their replies (the last 256).
    """

    lease: Lease
    bot: Bot
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    # Recent command ids → their replies: a retried command is answered, not re-sent.
    replies: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    @property
    def conversation_id(self) -> str:
        """The conversation this bot serves."""
        return self.lease.conversation_id

    @property
    def owner(self) -> str:
        """The lease's owner token (a claimed lease always has one)."""
        assert self.lease.owner is not None
        return self.lease.owner


def default_worker_id() -> str:
    """`host:pid:random`: readable in logs and records; the random part tells apart two
    processes that got the same pid."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(2)}"


class Worker:
    """Runs the bots of the conversations it claims, at most `capacity` at once (module doc).

    One loop task claims and heartbeats; each bot runs in its own task with a command
    listener beside it. The worker alone settles a bot's lease when the bot ends: finished,
    given back (shutdown), or offered again after a backoff when the bot crashed (up to
    `MAX_ATTEMPTS`); a lease it lost is left to its new owner.

    Args:
        store: the database holding the leases and the records.
        bus: wake-ups on the work channel; each conversation's commands and replies.
        personas: the personas by name, for the bots' tools and replica detection.
        publish: awaited with each newly stored record (bots' and the worker's `worker.*`
            notes): the live feed.
        worker_id: this worker's name in logs, records and lease owner tokens (default
            `default_worker_id()`).
        factory: builds the bot of a claimed conversation (default: a `ConversationBot` in
            a Daily room, or a local room for `ws://` URLs).
        capacity: bots run at once at most; claims stop at this number.
        lease_seconds: a lease not renewed for this long may be claimed by another worker;
            renewed every third of it.
        poll_interval: seconds between claim rounds when no wake-up comes (at most a third of
            `lease_seconds`).
        bot_name: the bots' user name in the room, unless the lease names another.
        room_policy: the rooms a bot may join, checked on every claimed lease before a bot is
            built (a row may predate the API's check); default `RoomPolicy()`: Daily's
            domains only.
    """

    def __init__(
        self,
        *,
        store: SqlStore,
        bus: Bus,
        personas: dict[str, Persona],
        publish: OnRecord,
        worker_id: str | None = None,
        factory: BotFactory | None = None,
        capacity: int = 20,
        lease_seconds: float = 15.0,
        poll_interval: float = 1.0,
        bot_name: str = "cvi-agent",
        room_policy: RoomPolicy | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.leases = Leases(store)
        self.personas = personas
        self.publish = publish
        self.worker_id = worker_id or default_worker_id()
        self.factory = factory or default_bot_factory
        self.capacity = capacity
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.bot_name = bot_name
        self.room_policy = room_policy or RoomPolicy()
        self.running: dict[str, RunningBot] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_heartbeat = 0.0
        self._ready = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(
        cls,
        s: Settings,
        *,
        store: SqlStore,
        bus: Bus,
        personas: dict[str, Persona],
        publish: OnRecord,
        factory: BotFactory | None = None,
    ) -> Worker:
        """A worker sized and named by the settings (`CVI_BOT_FACTORY`, capacity, leases,
        `CVI_ROOM_HOSTS` and `CVI_LOCAL_ROOMS`)."""
        return cls(
            store=store,
            bus=bus,
            personas=personas,
            publish=publish,
            factory=factory or load_factory(s.bot_factory),
            capacity=s.worker_capacity,
            lease_seconds=s.lease_seconds,
            poll_interval=s.worker_poll_interval,
            bot_name=s.bot_name,
            room_policy=RoomPolicy.from_settings(s),
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop and return once it listens for wake-ups (or after 10 s), so a
        conversation offered right after is claimed at once; raises what killed the loop."""
        self._task = asyncio.create_task(self._loop(), name=f"worker-{self.worker_id}")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()  # raise what stopped it

    async def run_forever(self) -> None:
        """`start`, then wait on the loop, which ends only when cancelled; the caller still
        calls `aclose` to stop the bots and give their leases back."""
        await self.start()
        assert self._task is not None
        await self._task

    async def aclose(self, release: bool = True) -> None:
        """Stop the loop and every bot, then give the bots' tasks 15 s to settle their leases
        (cancelled after). With `release` the leases are given back at once, so another worker
        takes over; without it they are finished, as if no bot were wanted any more."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        running = list(self.running.values())
        for rb in running:
            rb.stop_reason = "worker_shutdown" if release else "worker_stopped"
        await asyncio.gather(
            *(self._stop_bot(rb, rb.stop_reason or "worker_shutdown") for rb in running),
            return_exceptions=True,
        )
        tasks = [rb.task for rb in running if rb.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        log.info(
            "worker %s: capacity %d, lease %.1fs", self.worker_id, self.capacity, self.lease_seconds
        )
        while not self._stopping:
            try:
                async with self.bus.subscribe(WORK_CHANNEL, maxsize=16) as wake:
                    self._ready.set()
                    while not self._stopping:
                        await self._tick_safely()
                        await self._wait(wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # No wake-ups (the bus is down): keep working by polling, retry the bus later.
                log.warning("worker %s: bus unavailable (%s); polling", self.worker_id, exc)
                self._ready.set()
                for _ in range(10):
                    await self._tick_safely()
                    await self._wait(None)

    async def _tick_safely(self) -> None:
        try:
            await self.tick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("worker %s: %s (will retry)", self.worker_id, exc)

    async def _wait(self, wake: Subscription | None) -> None:
        timeout = min(self.poll_interval, self.lease_seconds / 3)
        if wake is None:
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError):
            await wake.next(max_wait=timeout)
        # Several wake-ups in a row need one claim round, not several.
        while wake.pending():
            await wake.next()

    async def tick(self) -> None:
        """One round: heartbeat when due, then claim what capacity allows."""
        if time.monotonic() - self._last_heartbeat >= self.lease_seconds / 3:
            await self.heartbeat()
        free = self.capacity - len(self.running)
        if free > 0:
            for lease in await self.leases.claim(self.worker_id, self.lease_seconds, free):
                await self._adopt(lease)

    async def heartbeat(self) -> None:
        """Renew every running bot's lease in one statement; a bot whose lease is missing from
        the answer was taken over or ended, and is stopped at once (fencing)."""
        self._last_heartbeat = time.monotonic()
        running = [rb for rb in self.running.values() if rb.stop_reason is None]
        if not running:
            return
        held = await self.leases.renew([rb.owner for rb in running], self.lease_seconds)
        for rb in running:
            if rb.owner not in held:
                log.warning(
                    "worker %s: lease of %s lost (taken over or ended); stopping its bot",
                    self.worker_id,
                    rb.conversation_id,
                )
                rb.stop_reason = "lease_lost"
                self._spawn(self._stop_bot(rb, "lease_lost"))

    async def _adopt(self, lease: Lease) -> None:
        cid = lease.conversation_id
        current = self.running.get(cid)
        if current is not None and current.stop_reason is None:
            # Our own lease expired (a stalled heartbeat) and we re-claimed it: same bot.
            current.lease = lease
            return
        conversation = await self.store.get_conversation(cid)
        if conversation is not None and conversation.status == "ended":
            await self.leases.finish(cid, lease.owner)
            return
        payload = lease.payload
        persona_name = payload.get("persona") or (conversation.persona if conversation else None)
        spec = BotSpec(
            conversation_id=cid,
            conversation_url=str(payload.get("conversation_url") or ""),
            meeting_token=payload.get("meeting_token"),
            persona=self.personas.get(persona_name) if persona_name else None,
            bot_name=str(payload.get("bot_name") or self.bot_name),
            store=self.store,
            on_record=self.publish,
        )
        try:
            self.room_policy.check(spec.conversation_url)
        except RoomRefused as exc:
            # Not a failure to retry: the same URL is refused on every worker, every time.
            log.warning("worker %s: not joining the room of %s: %s", self.worker_id, cid, exc)
            await self.leases.finish(cid, lease.owner)
            await self._note_raw(cid, "worker.refused", {"error": str(exc)})
            return
        try:
            bot = self.factory(spec)
        except Exception as exc:
            log.exception("worker %s: cannot create a bot for %s", self.worker_id, cid)
            await self._failed(lease, f"cannot create bot: {exc}")
            return
        rb = RunningBot(lease=lease, bot=bot)
        self.running[cid] = rb
        rb.task = asyncio.create_task(self._run_bot(rb, spec), name=f"bot-{cid}")
        log.info(
            "worker %s: took %s (attempt %d)",
            self.worker_id,
            cid,
            int(payload.get("attempts", 0) or 0) + 1,
        )

    async def _run_bot(self, rb: RunningBot, spec: BotSpec) -> None:
        cid = rb.conversation_id
        commands: asyncio.Task[None] | None = None
        failure: str | None = None
        reason = "finished"
        try:
            if not spec.conversation_url:
                raise RuntimeError("the lease has no conversation_url")
            await rb.bot.start(spec.conversation_url, spec.meeting_token)
            await self._note(cid, "worker.started", rb, {})
            ready = asyncio.Event()
            commands = asyncio.create_task(self._serve_commands(rb, ready))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await ready.wait()
            reason = await rb.bot.run()
            if rb.stop_reason is None and reason.startswith("room lost"):
                # The bot gave up reconnecting; the conversation may well go on: retry (here
                # or on another worker) rather than leave it without a bot.
                failure = reason
        except asyncio.CancelledError:
            reason = rb.stop_reason or "cancelled"
            raise
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.warning("worker %s: bot for %s failed: %s", self.worker_id, cid, failure)
        finally:
            if commands is not None:
                commands.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await commands
            with contextlib.suppress(Exception):
                await rb.bot.stop(rb.stop_reason or reason)
            if self.running.get(cid) is rb:
                del self.running[cid]
            await self._settle(rb, reason, failure)

    async def _settle(self, rb: RunningBot, reason: str, failure: str | None) -> None:
        """What happens to the lease once a bot is gone."""
        cid = rb.conversation_id
        try:
            if rb.stop_reason == "lease_lost":
                return  # someone else owns it now, or it was removed
            if rb.stop_reason == "worker_shutdown":
                await self.leases.release(rb.owner)
                await self._note(cid, "worker.released", rb, {"reason": "worker_shutdown"})
                return
            if failure is not None:
                await self._failed(rb.lease, failure)
                return
            await self.leases.finish(cid, rb.owner)
            await self._note(cid, "worker.finished", rb, {"reason": rb.stop_reason or reason})
        except Exception as exc:
            log.warning("worker %s: could not settle the lease of %s: %s", self.worker_id, cid, exc)

    async def _failed(self, lease: Lease, error: str) -> None:
        attempts = int(lease.payload.get("attempts", 0) or 0) + 1
        payload = dict(lease.payload, attempts=attempts, last_error=error[:500])
        if lease.owner is None:
            return
        if attempts >= MAX_ATTEMPTS:
            await self.leases.finish(lease.conversation_id, lease.owner)
            await self._note_raw(
                lease.conversation_id,
                "worker.gave_up",
                {"attempts": attempts, "error": error[:500]},
            )
            return
        await self.leases.release(lease.owner, retry_in=min(30.0, 2.0**attempts), payload=payload)
        await self._note_raw(
            lease.conversation_id, "worker.failed", {"attempts": attempts, "error": error[:500]}
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_bot(self, rb: RunningBot, reason: str) -> None:
        try:
            await rb.bot.stop(reason)
        except Exception as exc:
            log.warning(
                "worker %s: stopping the bot of %s: %s", self.worker_id, rb.conversation_id, exc
            )

    # -- commands ------------------------------------------------------------------------------

    async def _serve_commands(self, rb: RunningBot, ready: asyncio.Event) -> None:
        """Answer the conversation's commands for as long as the bot runs (resubscribing if
        the bus fails; a command lost meanwhile times out at the API, never succeeds silently)."""
        channel = commands_channel(rb.conversation_id)
        while True:
            try:
                async with self.bus.subscribe(channel, maxsize=256) as sub:
                    ready.set()
                    while True:
                        message = await sub.next()
                        if message is None:
                            log.warning(
                                "worker %s: commands for %s may have been lost",
                                self.worker_id,
                                rb.conversation_id,
                            )
                            continue
                        reply = await self._command(rb, message)
                        reply_to = message.get("reply_to")
                        if reply_to and reply is not None:
                            with contextlib.suppress(Exception):
                                await self.bus.publish(str(reply_to), reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "worker %s: command channel of %s failed (%s); resubscribing",
                    self.worker_id,
                    rb.conversation_id,
                    exc,
                )
                await asyncio.sleep(1.0)

    async def _command(self, rb: RunningBot, message: dict[str, Any]) -> dict[str, Any] | None:
        command_id = str(message.get("id") or "")
        if command_id and command_id in rb.replies:
            return rb.replies[command_id]
        op = message.get("op")
        if op == "stop":
            rb.stop_reason = str(message.get("reason") or "stopped")
            self._spawn(self._stop_bot(rb, rb.stop_reason))
            reply: dict[str, Any] = {"ok": True, "worker": self.worker_id}
        elif op == "send":
            reply = await self._send(rb, command_id, message.get("interaction"))
        else:
            reply = {"ok": False, "code": "unknown_command", "error": f"unknown op {op!r}"}
        if command_id:
            rb.replies[command_id] = reply
            while len(rb.replies) > 256:
                rb.replies.popitem(last=False)
        return reply

    async def _send(self, rb: RunningBot, command_id: str, raw: Any) -> dict[str, Any]:
        cid = rb.conversation_id
        try:
            interaction = InteractionRequest.parse(raw if isinstance(raw, dict) else {})
        except ValidationError as exc:
            return {"ok": False, "code": "invalid_interaction", "error": str(exc)[:500]}
        try:
            await rb.bot.send(interaction)
        except Exception as exc:
            log.warning("worker %s: sending into %s failed: %s", self.worker_id, cid, exc)
            return {"ok": False, "code": "send_failed", "error": f"{type(exc).__name__}: {exc}"}
        # The bot records what it sent (source `bot`, kind `interaction.<event_type>`).
        return {"ok": True, "worker": self.worker_id, "message": interaction.to_message(cid)}

    # -- recording -----------------------------------------------------------------------------

    async def _note(self, cid: str, kind: str, rb: RunningBot, extra: dict[str, Any]) -> None:
        await self._note_raw(cid, kind, dict(extra, owner=rb.owner), key=f"{kind}|{rb.owner}")

    async def _note_raw(
        self, cid: str, kind: str, payload: dict[str, Any], key: str | None = None
    ) -> None:
        await self._record(
            EventRecord(
                conversation_id=cid,
                source="bot",
                kind=kind,
                dedupe_key=key or f"{kind}|{secrets.token_hex(8)}",
                payload=dict(payload, worker=self.worker_id),
                occurred_at=time.time(),
            )
        )

    async def _record(self, event: EventRecord) -> None:
        try:
            for new in await self.store.add_events([event]):
                await self.publish(new)
        except Exception as exc:
            log.warning("worker %s: could not record %s: %s", self.worker_id, event.kind, exc)
