"""The live feed: a conversation's stored events after a cursor, then each new one as it is
stored, each once; served as Server-Sent Events at `GET /api/conversations/{id}/events/stream`.

`event_feed` is the one implementation both transports use: the websocket (`WS …/live` in
`api.py`, kept for compatibility) and the SSE stream here, which a browser opens with `fetch`
and the key in the `Authorization` header, so a key never travels in a URL. It subscribes to
the conversation's bus channel *first*, then reads the stored backlog after the cursor, then
says `Live`, then passes on every published event. Ids sent recently are remembered (a bounded
set), which is all the hand-over from backlog to live needs: only events published after the
subscription began can come both ways. When the bus signals a gap (this subscriber's queue
overflowed because the client is slow, or Redis reconnected), the feed reads the store after
the highest id it has sent: a slow consumer is caught up, not dropped.

Each SSE event's `id:` is the event id, so a client that reconnects with `Last-Event-ID` (or
`?after=`) misses nothing and gets nothing twice. sse-starlette's `EventSourceResponse` does
the framing, the pings that keep proxies from closing an idle stream, the per-send timeout
that closes a client that stopped reading, and the watch for the client going away; its
per-send cancel scope costs nothing that matters here (the chat hot path keeps its own lean
response, `llm/sse.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from cvi_agent.bus import Bus, BusUnavailable, Message, events_channel
from cvi_agent.conversations.deps import require_conversations
from cvi_agent.store import SqlStore
from cvi_agent.web.auth import require_key
from cvi_agent.web.errors import ApiError

log = logging.getLogger(__name__)

BATCH = 500  # events read from the store at a time
QUEUE_SIZE = 1000  # live events waiting for a slow client before the feed resyncs from the store
REMEMBERED = 4 * QUEUE_SIZE  # ids remembered to drop an event that comes both ways
PING_SECONDS = 15.0  # an idle stream gets a comment this often: proxies keep it open
SEND_TIMEOUT = 30.0  # a client that takes nothing for this long is closed
SHUTDOWN_GRACE = 2.0  # seconds a stream has to end cleanly when the server shuts down
RETRY_MS = 2000  # the reconnection delay suggested to EventSource clients
MAX_EVENT_ID = 2**63 - 1  # a BIGINT: larger ids cannot be bound as query parameters


@dataclass(frozen=True, slots=True)
class Live:
    """The stored backlog has been sent (`backlog` events); what follows is live."""

    backlog: int


FeedItem = Message | Live


class _Sent:
    """The ids sent most recently, at most `size` of them (the oldest is forgotten first)."""

    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[int, None] = OrderedDict()
        self._size = size

    def add(self, event_id: int) -> bool:
        """Remember `event_id`; False when it was already sent."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


async def event_feed(
    store: SqlStore,
    bus: Bus,
    conversation_id: str,
    after: int = 0,
    *,
    stop: anyio.Event | None = None,
) -> AsyncGenerator[FeedItem, None]:
    """Every event of the conversation stored after the id `after` (as `EventRecord.as_dict()`),
    then `Live(backlog)`, then each event as it is stored, each once.

    It ends only when `stop` is set (or when closed or cancelled by its consumer); it raises
    `BusUnavailable` when the bus cannot subscribe. Memory stays bounded whatever the
    conversation's length or the client's speed: one page of the store, the subscription's
    queue (`QUEUE_SIZE`) and the remembered ids (`REMEMBERED`).
    """
    sent = _Sent(REMEMBERED)
    cursor = after  # the store is read after this id: the highest id sent
    backlog: int | None = 0  # events sent before `Live`; None once it was said
    catching_up = True
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        async with bus.subscribe(events_channel(conversation_id), maxsize=QUEUE_SIZE) as sub:
            while True:
                if catching_up:
                    batch = await store.list_events(
                        conversation_id, after_id=cursor, limit=BATCH, order="id"
                    )
                    for event in batch:
                        if event.id is None:
                            continue
                        cursor = max(cursor, event.id)  # a full page always moves it on
                        if not sent.add(event.id):
                            continue
                        if backlog is not None:
                            backlog += 1
                        yield event.as_dict()
                    if len(batch) == BATCH:
                        continue
                    catching_up = False
                    if backlog is not None:
                        yield Live(backlog)
                        backlog = None
                if stopping is None:
                    message = await sub.next()
                else:
                    getter = asyncio.ensure_future(sub.next())
                    try:
                        await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not getter.done():
                            getter.cancel()
                    if not getter.done():
                        return  # stopped
                    message = getter.result()
                if message is None:  # a gap: what the bus lost is in the store
                    catching_up = True
                    continue
                event_id = message.get("id")
                if isinstance(event_id, int):
                    if not sent.add(event_id):
                        continue
                    cursor = max(cursor, event_id)
                yield message
    finally:
        if stopping is not None:
            stopping.cancel()


def parse_event_id(value: str | None, name: str) -> int | None:
    """An event-id cursor from a header or query parameter (None when absent); 400 otherwise."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > MAX_EVENT_ID:
        raise ApiError(400, f"{name} must be an event id.", "invalid_after", name)
    return int(text)


def _data(item: Message | dict[str, int]) -> str:
    # ASCII: any text the store holds (even an unpaired surrogate) can be encoded on the wire.
    return json.dumps(item, separators=(",", ":"), ensure_ascii=True, default=str)


async def _server_sent_events(
    feed: AsyncGenerator[FeedItem, None], conversation_id: str
) -> AsyncIterator[ServerSentEvent]:
    """The feed as SSE events; a failure ends the stream with an `error` event (the client
    reconnects with `Last-Event-ID`) instead of an unfinished response."""
    async with contextlib.aclosing(feed):
        try:
            async for item in feed:
                if isinstance(item, Live):
                    yield ServerSentEvent(
                        _data({"backlog": item.backlog}), event="live", retry=RETRY_MS
                    )
                    continue
                event_id = item.get("id")
                yield ServerSentEvent(
                    _data(item), id=str(event_id) if isinstance(event_id, int) else None
                )
        except BusUnavailable as exc:
            log.warning("event stream of %s: %s", conversation_id, exc)
            message = "event bus unavailable; reconnect with Last-Event-ID"
            yield ServerSentEvent(_data({"message": message}), event="error")
        except Exception:
            log.exception("event stream of %s failed", conversation_id)
            yield ServerSentEvent(_data({"message": "internal error"}), event="error")


class EventStream(EventSourceResponse):
    """sse-starlette's response with our bounds, ending quietly when a client stops reading
    (a send that waits longer than `SEND_TIMEOUT` closes the stream with one info line, not
    a traceback).

    Args:
        content: the SSE events to send.
        conversation_id: whose feed it is (for the log).
        stop: set by sse-starlette when the server shuts down; the feed watching it ends, so
            the stream finishes cleanly within `SHUTDOWN_GRACE` instead of being cut off.
    """

    def __init__(
        self, content: AsyncIterator[ServerSentEvent], conversation_id: str, stop: anyio.Event
    ) -> None:
        self.conversation_id = conversation_id
        super().__init__(
            content,
            ping=PING_SECONDS,
            send_timeout=SEND_TIMEOUT,
            shutdown_event=stop,
            shutdown_grace_period=SHUTDOWN_GRACE,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info(
                "event stream of %s: the client took nothing for %gs; closed",
                self.conversation_id,
                SEND_TIMEOUT,
            )


router = APIRouter(prefix="/api/conversations", tags=["conversations"])


@router.get(
    "/{conversation_id}/events/stream",
    dependencies=[Depends(require_key)],
    summary="The live feed as Server-Sent Events (backlog, then live; Last-Event-ID resumes)",
    response_class=EventSourceResponse,
)
async def stream_events(
    request: Request,
    conversation_id: str,
    after: str | None = None,
    last_event_id: str | None = Header(default=None),
) -> EventStream:
    """Every event of the conversation as `text/event-stream`: first those stored after the
    cursor, then an `event: live` (`{"backlog": N}`), then each new event as it is stored.

    Each event is one SSE message (the default `message` type) whose `id:` is the event id
    and whose `data:` is the event as JSON (`id`, `source`, `kind`, `payload`, …). To resume,
    send the last id you saw as `Last-Event-ID` (an `EventSource` does it by itself) or as
    `?after=`; the header wins when both are sent. A comment line every 15 s keeps proxies
    from closing an idle stream. A client too slow to keep up is caught up from the store
    instead of losing events; one that reads nothing for 30 s is disconnected. Key in the
    `Authorization: Bearer` (or `x-api-key`) header, never in the URL. 400 `invalid_after`
    for a cursor that is not an event id, 404 `conversation_not_found`.
    """
    record = require_conversations(request.app.state)
    header = parse_event_id(last_event_id, "Last-Event-ID")
    cursor = header if header is not None else parse_event_id(after, "after")
    if await record.store.get_conversation(conversation_id) is None:
        raise ApiError(404, f"No conversation {conversation_id!r}.", "conversation_not_found", "id")
    stop = anyio.Event()
    feed = event_feed(record.store, record.bus, conversation_id, cursor or 0, stop=stop)
    return EventStream(_server_sent_events(feed, conversation_id), conversation_id, stop)
