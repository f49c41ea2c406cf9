"""Speculative turns across processes: one owner per conversation, found in Redis.

With `CVI_REDIS_URL` set, the first process that answers a turn of a conversation becomes its
*owner*: an atomic script sets `cvi:turns:owner:<conversation id>` to the address of the
process's turn listener, with a short TTL (`OWNER_TTL_MS`) the owner's heartbeat refreshes
while the conversation is active. Every later turn of that conversation, whichever process
receives it, is answered by the owner's `TurnTracker`: a process that is not the owner sends
the request over one TCP connection to the owner's listener and relays the answer's bytes as
they come. So supersede (cancel the older upstream request at once), replay (the final request
starts with the tokens already produced) and the side-effect settle clock are exactly those of
one process, whatever the load balancer does. The owner answers its own conversations with no
Redis round trip (it knows it holds them); a new conversation costs one.

Failure behaviour (ARCHITECTURE.md, "Speculative turns across processes"):

- Owner dead or stuck: the forwarder connects with a deadline and the owner acknowledges a
  request as soon as it has it, before any token; no acknowledgement within `FORWARD_TIMEOUT`
  (a refused connection is immediate), or a connection lost before the first byte of the
  answer, and the forwarder takes the conversation over (a compare-and-set on the owner key)
  and starts a fresh generation itself. A connection lost mid-answer ends that answer cleanly.
- Redis unreachable or slow: `RedisLink` gives up after its timeout, warns once, sets
  `cvi_turns_coordination_up` to 0, and every process answers its own requests (today's
  single-process behaviour per process) until Redis answers again.
- Memory: one small key per active conversation, always with a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

from cvi_agent import metrics
from cvi_agent.llm.coordination import Accept, TurnCoordinator
from cvi_agent.llm.redis_link import LinkDown, RedisLink
from cvi_agent.llm.turns import TurnTracker

if TYPE_CHECKING:
    from starlette.types import Message, Send

    from cvi_agent.config import Settings
    from cvi_agent.llm.brains.base import Brain, TurnContext
    from cvi_agent.llm.sse import ChunkEncoder, PushBody

log = logging.getLogger(__name__)

OWNER_PREFIX = "cvi:turns:owner:"
OWNER_TTL_MS = 3000  # an owner that stops refreshing (dead) loses its conversations this soon
HEARTBEAT = 1.0  # seconds between refreshes of the conversations a process holds
IDLE = 60.0  # a conversation quiet this long, nothing running, is let go (its key expires)
FORWARD_TIMEOUT = 0.5  # connect + acknowledgement from the owner, else take over
REQUEST_TIMEOUT = 5.0  # the owner waits this long for a forwarded request's frame
REFRESH_BATCH = 500

# Frames on a forwarding connection: a type byte and a 4-byte length, then the payload.
_HEAD = struct.Struct(">cI")
REQUEST = b"Q"  # forwarder → owner: the request (JSON)
ACCEPTED = b"A"  # owner → forwarder: the owner answers it (sent before any token)
REFUSED = b"R"  # owner → forwarder: the owner cannot answer it (the forwarder does)
DATA = b"D"  # owner → forwarder: response body bytes, more to come
LAST = b"L"  # owner → forwarder: the last response body bytes

# Owner of KEYS[1]: ARGV[1] (us) if nobody holds it, or if it is held by ARGV[3] (an owner
# that did not answer: taken over); else whoever holds it. The key's TTL is ARGV[2] ms.
_ROUTE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and owner ~= ARGV[3] then
  return owner
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
# Refresh the keys still ours (or gone: taken back); the 1-based indexes of those lost.
_REFRESH = """
local lost = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] or not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, i)
  end
end
return lost
"""
# Let go of the keys still ours (shutdown: the next turn elsewhere needs no takeover).
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class _Refused(Exception):
    """The owner answered that it cannot take this request."""


def frame(kind: bytes, payload: bytes) -> bytes:
    """One frame of the forwarding protocol."""
    return _HEAD.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """The next frame; `ValueError` past `limit` bytes, `IncompleteReadError` at EOF."""
    kind, size = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if size > limit:
        raise ValueError(f"frame of {size} bytes")
    return kind, await reader.readexactly(size) if size else b""


def link_token(api_keys: tuple[str, ...]) -> str:
    """What a forwarded request carries to show it comes from a process of this deployment:
    derived from the API keys every process shares (never the keys themselves)."""
    material = "\0".join(sorted(api_keys)).encode()
    return hashlib.sha256(b"cvi-turns\0" + material).hexdigest()


def advertised_host(host: str) -> str:
    """The address other processes reach a listener bound to `host` at."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(socket.gethostname())
    return host


class SharedTurns(TurnCoordinator):
    """Turns of conversations shared between processes over Redis (see the module doc).

    Args:
        settings: `redis_url`, `turns_host`/`turns_port` (the listener), `api_keys` (the
            forwarding token), `max_body_bytes`.
        local: this process's tracker: it answers the conversations this process owns, and
            every conversation while Redis is down.
    """

    def __init__(self, settings: Settings, local: TurnTracker) -> None:
        assert settings.redis_url
        self.settings = settings
        self.local = local
        self.link = RedisLink(settings.redis_url)
        self._route = self.link.script(_ROUTE)
        self._refresh = self.link.script(_REFRESH)
        self._release = self.link.script(_RELEASE)
        self._token = link_token(settings.api_keys)
        self._limit = settings.max_body_bytes * 2 + 65536
        self.me = ""  # host:port of our listener, once started
        self.held: dict[str, float] = {}  # conversations we own → their last turn (loop time)
        self._refreshed = -1e9  # when the heartbeat last refreshed `held` (loop time)
        self._accept: Accept | None = None
        self._server: asyncio.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._warned = False  # a bad connection to the listener was logged

    async def start(self, accept: Accept) -> None:
        """Listen for forwarded turns and start the heartbeat."""
        self._accept = accept
        host = self.settings.turns_host
        self._server = await asyncio.start_server(
            self._serve, host, self.settings.turns_port, limit=65536
        )
        port = self._server.sockets[0].getsockname()[1]
        self.me = f"{advertised_host(host)}:{port}"
        loop = asyncio.get_running_loop()
        with contextlib.suppress(LinkDown):
            await self.link.run(self.link.client.ping())
            self._refreshed = loop.time()
        self._heartbeat = loop.create_task(self._beat())

    # this process receives a turn

    def open(self, brain: Brain, ctx: TurnContext, enc: ChunkEncoder, started: float) -> PushBody:
        """Answer here if we own the conversation (no Redis call), else a body that finds the
        owner first (`_Routed`)."""
        cid = ctx.conversation_id
        assert cid is not None
        now = asyncio.get_running_loop().time()
        if cid in self.held and self._fresh(now):
            self.held[cid] = now
            return self.local.open(brain, ctx, enc, started)
        return _Routed(self, brain, ctx, enc, started)

    def _fresh(self, now: float) -> bool:
        """Whether our keys are known to be alive (refreshed less than a TTL ago, minus the
        time a heartbeat may take)."""
        return now - self._refreshed < OWNER_TTL_MS / 1000 - HEARTBEAT

    async def owner_of(self, cid: str, dead: str = "") -> str | None:
        """The address of the process that answers `cid`, None for this one (we own it, or
        Redis is down). `dead`: an owner that did not answer, taken over if still there."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not dead and cid in self.held and self._fresh(now):
            self.held[cid] = now
            return None
        if not self.link.usable(now):
            metrics.turn_routed("local_fallback")
            return None
        try:
            owner = await self.link.run(
                self._route(keys=[OWNER_PREFIX + cid], args=[self.me, OWNER_TTL_MS, dead])
            )
        except LinkDown:
            metrics.turn_routed("local_fallback")
            return None
        owner = owner.decode() if isinstance(owner, bytes) else str(owner)
        if owner == self.me:
            self.held[cid] = loop.time()
            if dead:
                metrics.turn_routed("taken_over")
                log.warning(
                    "conversation %s: its owner %s did not answer; answering it here", cid, dead
                )
            return None
        return owner

    # this process owns the conversation of a forwarded turn

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        body: PushBody | None = None
        try:
            cap = self.settings.max_connections
            if cap and len(self._serving) > cap:
                # Bounded like the web server (CVI_MAX_CONNECTIONS): the forwarder answers
                # this turn itself, at once, instead of queueing behind a flood.
                writer.write(frame(REFUSED, b"turn listener busy (CVI_MAX_CONNECTIONS)"))
                return
            kind, data = await asyncio.wait_for(read_frame(reader, self._limit), REQUEST_TIMEOUT)
            request = json.loads(data) if kind == REQUEST else None
            token = request.get("token") if isinstance(request, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), self._token.encode()
            ):
                # Logged once per process: whoever can reach the port must not fill the log.
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "turn listener: a connection without a valid request, closed")
                return
            assert isinstance(request, dict) and self._accept is not None
            cid = request.get("conversation_id")
            request_id = request.get("request_id")
            try:
                raw = request.get("raw")
                if not isinstance(cid, str) or not cid or not isinstance(raw, dict):
                    raise ValueError("no conversation id or no request")
                brain, ctx, enc = self._accept(
                    raw, cid, request_id if isinstance(request_id, str) else None
                )
            except Exception as exc:  # not valid here (a persona missing?): the forwarder answers
                writer.write(frame(REFUSED, str(exc).encode()[:500]))
                return
            self.held[cid] = asyncio.get_running_loop().time()
            body = self.local.open(brain, ctx, enc, time.perf_counter())
            writer.write(frame(ACCEPTED, b""))
            await writer.drain()
            await _answer(body, reader, writer)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            log.debug("turn listener: forwarded turn ended: %r", exc)
        finally:
            self._serving.discard(task)
            if body is not None:
                await body.aclose()
            writer.close()

    # heartbeat

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._refresh_held(loop.time())
            except Exception as exc:  # the heartbeat must outlive anything
                log.debug("turn coordination: heartbeat failed: %r", exc)

    async def _refresh_held(self, now: float) -> None:
        held = self.held
        for cid in [c for c, last in held.items() if now - last > IDLE]:
            if not self.local.running(cid):  # a long answer keeps its conversation held
                del held[cid]
        if not await self.link.probe():
            return
        keys = list(held)
        for i in range(0, len(keys), REFRESH_BATCH):
            batch = keys[i : i + REFRESH_BATCH]
            try:
                lost = await self.link.run(
                    self._refresh(
                        keys=[OWNER_PREFIX + c for c in batch], args=[self.me, OWNER_TTL_MS]
                    )
                )
            except LinkDown:
                return
            for index in lost:
                held.pop(batch[int(index) - 1], None)
        self._refreshed = now

    def active(self) -> int:
        """Generations running in this process."""
        return self.local.active()

    async def aclose(self) -> None:
        """Stop listening and beating, let go of our conversations, cancel our generations."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._server is not None:
            self._server.close()
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        if self.held and self.link.up:
            keys = [OWNER_PREFIX + c for c in self.held]
            with contextlib.suppress(LinkDown):
                await self.link.run(self._release(keys=keys, args=[self.me]))
        self.held.clear()
        await self.local.aclose()
        await self.link.aclose()


async def _answer(
    body: PushBody, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Send `body` as frames until it ends or the forwarder closes the connection (its client
    left: the body is closed, as when a client of ours leaves)."""

    async def send(message: Message) -> None:
        kind = DATA if message.get("more_body") else LAST
        writer.write(frame(kind, message.get("body", b"")))
        await writer.drain()

    running = asyncio.ensure_future(body.run(send))
    gone = asyncio.ensure_future(reader.read(1))  # the forwarder sends nothing more: EOF
    try:
        await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (running, gone):
            if not task.done():
                task.cancel()
        await asyncio.gather(running, gone, return_exceptions=True)


class _Routed:
    """The body of a turn whose conversation this process may not own: asks Redis who owns it,
    then either relays the owner's answer or answers here (see the module doc)."""

    __slots__ = ("_local", "_sent", "_writer", "brain", "ctx", "enc", "started", "turns")

    def __init__(
        self, turns: SharedTurns, brain: Brain, ctx: TurnContext, enc: ChunkEncoder, started: float
    ) -> None:
        self.turns = turns
        self.brain = brain
        self.ctx = ctx
        self.enc = enc
        self.started = started
        self._local: PushBody | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sent = 0

    @property
    def sent(self) -> int:
        """Messages sent so far (the keep-alive ping watches it)."""
        return self._local.sent if self._local is not None else self._sent

    @sent.setter
    def sent(self, value: int) -> None:
        self._sent = value

    async def run(self, send: Send) -> None:
        """Relay the owner's answer, or answer here."""
        turns = self.turns
        cid = self.ctx.conversation_id
        assert cid is not None
        owner = await turns.owner_of(cid)
        if owner is not None:
            try:
                if await self._forward(owner, send):
                    return
                owner = await turns.owner_of(cid, dead=owner)
            except _Refused as exc:
                metrics.turn_routed("refused")
                log.warning("conversation %s: owner %s refused a turn (%s)", cid, owner, exc)
                owner = None
            if owner is not None:  # another owner meanwhile: one more try, then here
                with contextlib.suppress(_Refused):
                    if await self._forward(owner, send):
                        return
        self._local = turns.local.open(self.brain, self.ctx, self.enc, self.started)
        await self._local.run(send)

    async def _forward(self, owner: str, send: Send) -> bool:
        """Relay the owner's answer; False when the owner did not answer (nothing was sent)."""
        host, _, port = owner.rpartition(":")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORWARD_TIMEOUT
        ctx = self.ctx
        limit = self.turns._limit
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), limit=65536), FORWARD_TIMEOUT
            )
        except (OSError, TimeoutError, ValueError):
            return False
        self._writer = writer
        request = {
            "token": self.turns._token,
            "conversation_id": ctx.conversation_id,
            "request_id": ctx.state.get("request_id"),
            "raw": ctx.state.get("raw"),
        }
        relayed = False
        try:
            writer.write(frame(REQUEST, json.dumps(request, separators=(",", ":")).encode()))
            kind, data = await asyncio.wait_for(
                read_frame(reader, limit), max(0.0, deadline - loop.time())
            )
            if kind == REFUSED:
                raise _Refused(data.decode(errors="replace"))
            if kind != ACCEPTED:
                return False
            metrics.turn_routed("forwarded")
            while True:
                kind, data = await read_frame(reader, limit)
                last = kind != DATA
                self._sent += 1
                relayed = True
                await send({"type": "http.response.body", "body": data, "more_body": not last})
                if last:
                    return True
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            if not relayed:
                return False
            # The owner went away mid-answer: end this one cleanly (what was said stays said).
            log.warning("conversation %s: owner %s lost mid-answer", ctx.conversation_id, owner)
            await send(
                {"type": "http.response.body", "body": self.enc.end("stop"), "more_body": False}
            )
            return True
        finally:
            writer.close()
            self._writer = None

    async def aclose(self) -> None:
        """The response ended: close the forwarding connection (the owner stops listening) or
        the local subscription."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if self._local is not None:
            await self._local.aclose()
