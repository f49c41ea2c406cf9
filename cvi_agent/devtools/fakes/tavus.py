"""A fake Tavus REST API on loopback, speaking the documented shapes (TAVUS_PROTOCOL §5).

For tests and the offline simulator: personas (create, list, get, JSON-Patch, delete) and
conversations (create, get, list, end, delete) in memory, `x-api-key` auth answered like Tavus
(401 `{"message": "Invalid access token"}`), scripted failures (`fail_next`), and — because a
real Tavus calls back — `send_callback` posts a webhook to a conversation's `callback_url`
(ending a conversation sends `system.shutdown` by itself).

Send App Message (`POST /v2/conversations/{id}/send-app-message`) keeps each conversation's
interactions in arrival order (`app_messages`) and hands each to `on_app_message` (the
simulator's replica), with Tavus's documented refusals: 400 for a conversation that is not
active, 410 for a room that is gone (`room_gone`), 413 over 65,536 bytes, and on demand
(`fail_app_messages`) 429 "Too many requests", 502 "could not be delivered" and 504 "may have
been delivered" (optionally delivering it anyway, as a real 504 may). `app_message_delay` slows
every answer, so overlapping sends show up in `app_message_spans`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Failure:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    path_prefix: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_prefix is None or path.startswith(self.path_prefix)
        )


# Tavus's documented send-app-message refusals (its API reference, "Send App Message").
APP_MESSAGE_LIMIT = 65_536
NOT_ACTIVE = "App messages can only be sent to active conversations."
ROOM_GONE = "The conversation's room is no longer available."
APP_MESSAGE_ERRORS: dict[str, tuple[int, str]] = {
    "rate_limited": (429, "Too many requests"),
    "not_delivered": (502, "The app message could not be delivered. Please retry."),
    "maybe_delivered": (504, "The app message may have been delivered; check before retrying."),
}


@dataclass
class AppMessageFailure:
    """A scripted send-app-message refusal (`FakeTavus.fail_app_messages`)."""

    status: int
    message: str
    retry_after: float | None
    deliver: bool


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JsonPatchError(ValueError):
    pass


def apply_json_patch(document: dict[str, Any], operations: Any) -> dict[str, Any]:
    """A small RFC 6902 implementation (add, replace, remove) for the fake's PATCH."""
    if not isinstance(operations, list):
        raise JsonPatchError("body must be a JSON Patch array")
    doc = copy.deepcopy(document)
    for op in operations:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
            raise JsonPatchError(f"unsupported operation {op!r}")
        path = op.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise JsonPatchError(f"invalid path {path!r}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
        target: Any = doc
        for part in parts[:-1]:
            if not isinstance(target, dict) or part not in target:
                raise JsonPatchError(f"path {path!r} does not exist")
            target = target[part]
        last = parts[-1]
        if not isinstance(target, dict):
            raise JsonPatchError(f"path {path!r} does not name an object member")
        if op["op"] == "remove":
            if last not in target:
                raise JsonPatchError(f"path {path!r} does not exist")
            del target[last]
        elif op["op"] == "replace" and last not in target:
            raise JsonPatchError(f"path {path!r} does not exist")
        else:
            if "value" not in op:
                raise JsonPatchError(f"operation on {path!r} has no value")
            target[last] = op["value"]
    return doc


class FakeTavus:
    """`with LoopbackServer(fake.app) as srv: fake.url = srv.url` — then point a client at it."""

    def __init__(
        self,
        api_key: str | None = "tavus-test-key",
        *,
        conversation_url: str | None = None,
        on_app_message: Callable[[str, dict[str, Any]], None] | None = None,
    ):
        """A fake with no personas and no conversations yet.

        Args:
            api_key: the key every request must carry as `x-api-key`; None takes any (the
                simulator's stand-in, which the server calls without one).
            conversation_url: the room URL of every conversation created (default: a made-up
                Daily URL per conversation).
            on_app_message: called with (conversation id, message) for each delivered
                send-app-message, on the fake's own thread (the simulator hands it to its loop).
        """
        self.api_key = api_key
        self.on_app_message = on_app_message
        self.app_messages: dict[str, list[dict[str, Any]]] = {}
        # (conversation id, event_type, started, ended) of every send-app-message answered 2xx
        self.app_message_spans: list[tuple[str, str, float, float]] = []
        self.app_message_delay = 0.0
        self._app_failures: deque[AppMessageFailure] = deque()
        self.url = ""
        # Where created conversations' rooms are: a fixed URL (a LocalRoom in tests) or a
        # made-up Daily URL per conversation.
        self.conversation_url = conversation_url
        self.personas: dict[str, dict[str, Any]] = {}
        self.conversations: dict[str, dict[str, Any]] = {}
        self.failures: deque[Failure] = deque()
        self.seen: list[Seen] = []
        self.callbacks_sent: list[tuple[str, dict[str, Any], int]] = []
        self.send_shutdown_on_end = True
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v2/personas", self._personas, methods=["GET", "POST"]),
                Route("/v2/personas/{pid}", self._persona, methods=["GET", "PATCH", "DELETE"]),
                Route("/v2/conversations", self._conversations, methods=["GET", "POST"]),
                Route("/v2/conversations/{cid}", self._conversation, methods=["GET", "DELETE"]),
                Route("/v2/conversations/{cid}/end", self._end, methods=["POST"]),
                Route(
                    "/v2/conversations/{cid}/send-app-message",
                    self._send_app_message,
                    methods=["POST"],
                ),
            ]
        )

    def fail_next(
        self,
        status: int,
        body: Any = None,
        *,
        count: int = 1,
        headers: dict[str, str] | None = None,
        method: str | None = None,
        path_prefix: str | None = None,
    ) -> None:
        """The next `count` matching requests fail with this status and body."""
        for _ in range(count):
            self.failures.append(Failure(status, body, dict(headers or {}), method, path_prefix))

    def fail_app_messages(
        self,
        kind: str,
        *,
        count: int = 1,
        retry_after: float | None = None,
        deliver: bool = False,
    ) -> None:
        """The next `count` send-app-messages get Tavus's documented refusal `kind`
        (`rate_limited` 429, `not_delivered` 502, `maybe_delivered` 504), with `Retry-After`
        when given; `deliver` delivers the message anyway (a 504 that did arrive)."""
        status, message = APP_MESSAGE_ERRORS[kind]
        for _ in range(count):
            self._app_failures.append(AppMessageFailure(status, message, retry_after, deliver))

    def add_conversation(self, conversation_id: str, **fields: Any) -> dict[str, Any]:
        """An active conversation created elsewhere (the simulator's), so messages to it are
        accepted."""
        conversation = {
            "conversation_id": conversation_id,
            "status": "active",
            "conversation_url": self.conversation_url,
            "created_at": _now_iso(),
            **fields,
        }
        self.conversations[conversation_id] = conversation
        return conversation

    def room_gone(self, conversation_id: str) -> None:
        """The conversation's room was deleted: send-app-message answers 410 from now on."""
        self.conversations[conversation_id]["room_available"] = False

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if (method is None or s.method == method) and (path is None or s.path == path)
        ]

    # -- plumbing ------------------------------------------------------------------------------

    async def _guard(self, request: Request) -> tuple[Any, Response | None]:
        return await self._guard_body(request, await request.body())

    @staticmethod
    def _page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
        try:
            limit = max(1, int(request.query_params.get("limit", "10")))
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            limit, page = 10, 1
        start = (page - 1) * limit
        return {"data": items[start : start + limit], "total_count": len(items)}

    # -- personas ------------------------------------------------------------------------------

    def _public_persona(self, persona: dict[str, Any]) -> dict[str, Any]:
        shown = copy.deepcopy(persona)
        llm = shown.get("layers", {}).get("llm")
        if isinstance(llm, dict) and "api_key" in llm:
            del llm["api_key"]  # like a real API, never echo secrets back
        return shown

    async def _personas(self, request: Request) -> Response:
        body, refused = await self._guard(request)
        if refused is not None:
            return refused
        if request.method == "GET":
            return JSONResponse(
                self._page([self._public_persona(p) for p in self.personas.values()], request)
            )
        if not isinstance(body, dict) or not body.get("persona_name"):
            return JSONResponse({"error": "persona_name is required"}, status_code=400)
        if body.get("pipeline_mode", "full") not in ("full", "echo"):
            return JSONResponse({"error": "Invalid pipeline_mode"}, status_code=400)
        persona_id = "p" + secrets.token_hex(5)
        persona = dict(body, persona_id=persona_id, created_at=_now_iso())
        self.personas[persona_id] = persona
        return JSONResponse(
            {
                "persona_id": persona_id,
                "persona_name": body["persona_name"],
                "created_at": persona["created_at"],
            }
        )

    async def _persona(self, request: Request) -> Response:
        body, refused = await self._guard(request)
        if refused is not None:
            return refused
        persona_id = request.path_params["pid"]
        persona = self.personas.get(persona_id)
        if persona is None:
            return JSONResponse({"error": "Persona not found"}, status_code=404)
        if request.method == "GET":
            return JSONResponse(self._public_persona(persona))
        if request.method == "DELETE":
            del self.personas[persona_id]
            return Response(status_code=204)
        try:
            patched = apply_json_patch(persona, body)
        except JsonPatchError as exc:
            return JSONResponse({"error": f"Invalid patch: {exc}"}, status_code=400)
        patched["persona_id"] = persona_id
        patched["updated_at"] = _now_iso()
        self.personas[persona_id] = patched
        return JSONResponse(self._public_persona(patched))

    # -- conversations -------------------------------------------------------------------------

    async def _conversations(self, request: Request) -> Response:
        body, refused = await self._guard(request)
        if refused is not None:
            return refused
        if request.method == "GET":
            return JSONResponse(self._page(list(self.conversations.values()), request))
        if not isinstance(body, dict):
            return JSONResponse({"error": "Invalid request body"}, status_code=400)
        persona_id = body.get("persona_id")
        if not persona_id and not body.get("replica_id"):
            return JSONResponse({"error": "persona_id or replica_id is required"}, status_code=400)
        if persona_id and persona_id not in self.personas:
            return JSONResponse({"error": "Invalid persona_id"}, status_code=400)
        max_participants = body.get("max_participants")
        if max_participants is not None and (
            not isinstance(max_participants, int) or max_participants < 2
        ):
            return JSONResponse({"error": "max_participants must be at least 2"}, status_code=400)
        conversation_id = "c" + secrets.token_hex(5)
        url = self.conversation_url or f"https://tavus.daily.co/{conversation_id}"
        conversation = {
            "conversation_id": conversation_id,
            "conversation_name": body.get("conversation_name") or f"Conversation {conversation_id}",
            "conversation_url": url,
            "status": "active",
            "callback_url": body.get("callback_url"),
            "created_at": _now_iso(),
            "persona_id": persona_id,
            "replica_id": body.get("replica_id"),
            "max_participants": max_participants,
            "properties": body.get("properties") or {},
        }
        if body.get("require_auth"):
            conversation["meeting_token"] = "mt-" + secrets.token_hex(8)
        self.conversations[conversation_id] = conversation
        return JSONResponse(conversation)

    async def _conversation(self, request: Request) -> Response:
        _, refused = await self._guard(request)
        if refused is not None:
            return refused
        conversation = self.conversations.get(request.path_params["cid"])
        if conversation is None:
            return JSONResponse({"error": "Conversation not found"}, status_code=404)
        if request.method == "DELETE":
            conversation["status"] = "deleted"
            return Response(status_code=204)
        return JSONResponse(conversation)

    async def _end(self, request: Request) -> Response:
        _, refused = await self._guard(request)
        if refused is not None:
            return refused
        conversation = self.conversations.get(request.path_params["cid"])
        if conversation is None:
            return JSONResponse({"error": "Conversation not found"}, status_code=404)
        if conversation["status"] == "ended":
            return JSONResponse({"error": "Conversation has already ended"}, status_code=400)
        conversation["status"] = "ended"
        if self.send_shutdown_on_end and conversation.get("callback_url"):
            task = asyncio.create_task(
                self._post_quietly(
                    conversation["conversation_id"],
                    "system.shutdown",
                    {"replica_id": "rfake", "shutdown_reason": "end_conversation_endpoint_hit"},
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return Response(status_code=200)

    # -- interactions ------------------------------------------------------------------------

    async def _send_app_message(self, request: Request) -> Response:
        started = time.monotonic()
        raw = await request.body()
        if len(raw) > APP_MESSAGE_LIMIT:
            self.seen.append(Seen(request.method, request.url.path, None, dict(request.headers)))
            return JSONResponse(
                {"error": f"Request body exceeds {APP_MESSAGE_LIMIT} bytes"}, status_code=413
            )
        body, refused = await self._guard_body(request, raw)
        if refused is not None:
            return refused
        cid = request.path_params["cid"]
        conversation = self.conversations.get(cid)
        if conversation is None:
            return JSONResponse({"error": "Conversation not found"}, status_code=404)
        if conversation.get("status") != "active":
            return JSONResponse({"error": NOT_ACTIVE}, status_code=400)
        if conversation.get("room_available") is False:
            return JSONResponse({"error": ROOM_GONE}, status_code=410)
        if not isinstance(body, dict):
            return JSONResponse({"error": "Invalid request body"}, status_code=400)
        if self.app_message_delay:
            await asyncio.sleep(self.app_message_delay)
        failure = self._app_failures.popleft() if self._app_failures else None
        if failure is not None:
            if failure.deliver:
                self._deliver(cid, body, started)
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = f"{failure.retry_after:g}"
            return JSONResponse(
                {"error": failure.message}, status_code=failure.status, headers=headers
            )
        self._deliver(cid, body, started)
        return JSONResponse({"status": "delivered"}, status_code=200)

    def _deliver(self, cid: str, message: dict[str, Any], started: float) -> None:
        self.app_messages.setdefault(cid, []).append(message)
        self.app_message_spans.append(
            (cid, str(message.get("event_type")), started, time.monotonic())
        )
        if self.on_app_message is not None:
            self.on_app_message(cid, message)

    async def _guard_body(self, request: Request, raw: bytes) -> tuple[Any, Response | None]:
        """`_guard` for a body already read."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self.seen.append(
            Seen(request.method, request.url.path, body, {k: v for k, v in request.headers.items()})
        )
        for i, failure in enumerate(self.failures):
            if failure.matches(request.method, request.url.path):
                del self.failures[i]
                return body, JSONResponse(
                    failure.body, status_code=failure.status, headers=failure.headers
                )
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return body, JSONResponse({"message": "Invalid access token"}, status_code=401)
        if isinstance(body, str):
            return body, JSONResponse({"error": "Invalid JSON body"}, status_code=400)
        return body, None

    # -- callbacks -----------------------------------------------------------------------------

    def callback_envelope(
        self, conversation_id: str, event_type: str, properties: dict[str, Any]
    ) -> dict[str, Any]:
        conversation = self.conversations.get(conversation_id, {})
        return {
            "properties": properties,
            "conversation_id": conversation_id,
            "webhook_url": conversation.get("callback_url"),
            "event_type": event_type,
            "message_type": "application" if event_type.startswith("application.") else "system",
            "timestamp": _now_iso(),
        }

    async def send_callback(
        self, conversation_id: str, event_type: str, properties: dict[str, Any]
    ) -> int:
        """POST a webhook to the conversation's `callback_url`, as Tavus would; returns status."""
        url = self.conversations[conversation_id]["callback_url"]
        payload = self.callback_envelope(conversation_id, event_type, properties)
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(url, json=payload)
        self.callbacks_sent.append((url, payload, response.status_code))
        return response.status_code

    async def _post_quietly(
        self, conversation_id: str, event_type: str, properties: dict[str, Any]
    ) -> None:
        try:
            await self.send_callback(conversation_id, event_type, properties)
        except httpx.HTTPError:
            pass
