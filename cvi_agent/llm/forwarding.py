"""A turn forwarded by another process (llm/shared_turns.py), made ready for the turn tracker
exactly as `POST /v1/chat/completions` would (same validation, same context)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from cvi_agent.llm.brains.base import Brain, TurnContext
from cvi_agent.llm.routes import build_turn
from cvi_agent.llm.service import ChatService
from cvi_agent.llm.sse import ChunkEncoder
from cvi_agent.web.request_id import REQUEST_ID_SCOPE_KEY


def accept_forwarded(
    chat: ChatService, raw: dict[str, Any], conversation_id: str, request_id: str | None
) -> tuple[Brain, TurnContext, ChunkEncoder]:
    """The brain, context and encoder answering a forwarded request (`ApiError` when it is not
    valid in this process). The forwarding process checked the caller's key and counted the
    request; this one answers it."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-conversation-id", conversation_id.encode())],
        REQUEST_ID_SCOPE_KEY: request_id,
    }
    ctx = build_turn(chat, Request(scope), raw)
    ctx.state["started"] = time.perf_counter()
    enc = ChunkEncoder(ctx.request.model, fingerprint=chat.fingerprints[ctx.persona.name])
    return chat.brains[ctx.persona.name], ctx, enc
