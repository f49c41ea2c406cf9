"""`POST /v1/chat/completions` (and `/chat/completions`), `GET /v1/models`, `GET /v1/models/{id}`.

The request is parsed and validated once; everything after that is the hot path: brain events
become pre-encoded SSE bytes. Without a conversation id, a closed client stream closes the brain
generator, which closes the upstream request. With one, the answer is a generation of the turn
tracker (supersede, replay, side effects held until final: llm/turns.py); see ARCHITECTURE.md,
"Speculative turns", for who cancels whom.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from cvi_agent import metrics
from cvi_agent.llm.brains.base import (
    Brain,
    Finish,
    TextDelta,
    ToolCallDelta,
    TurnContext,
    usage_of,
)
from cvi_agent.llm.capabilities import check_request
from cvi_agent.llm.failure import classify, fallback_headers, mode_of, note
from cvi_agent.llm.recording import observe_completion
from cvi_agent.llm.service import ChatService
from cvi_agent.llm.sse import ChunkEncoder, EventStreamResponse
from cvi_agent.llm.tools import ToolChoice, ToolRunner
from cvi_agent.protocol.chat import ChatCompletionRequest, ErrorResponse
from cvi_agent.web.access import facts_of
from cvi_agent.web.auth import key_dependency
from cvi_agent.web.body import read_json_object
from cvi_agent.web.errors import ApiError, validation_message
from cvi_agent.web.request_id import REQUEST_ID_SCOPE_KEY
from cvi_agent.web.security import CHAT_PATHS

log = logging.getLogger(__name__)


def _count_refusal(error: ApiError) -> None:
    metrics.request_done("unknown", error.status)


_require_key = key_dependency(on_refused=_count_refusal)
router = APIRouter(dependencies=[Depends(_require_key)])

CONVERSATION_HEADERS = ("conversation_id", "conversation-id", "x-conversation-id")


def conversation_id_from(request_headers: Any) -> str | None:
    """The conversation id Tavus sends as a header; its spelling is undocumented (any case)."""
    for name in CONVERSATION_HEADERS:
        value = request_headers.get(name)
        if value:
            value = str(value).strip()
            if value and len(value) <= 256:
                return value
    return None


def get_chat(request: Request) -> ChatService:
    """The process's chat service (set on `app.state.chat` by the app's lifespan)."""
    chat: ChatService = request.app.state.chat
    return chat


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 502, 503, 504)
}


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema (no recursive models) with its `#/$defs/…` references replaced by
    the definitions, for `openapi_extra`: inside an OpenAPI document those references point at
    the document's root, where no `$defs` exists, so no client generator (nor schemathesis)
    could resolve them. A discriminator's `mapping` names such references too: dropped."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {
                k: (
                    {"propertyName": v["propertyName"]}
                    if k == "discriminator" and isinstance(v, dict) and "mapping" in v
                    else resolve(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_defs(ChatCompletionRequest.model_json_schema())}
        },
    }
}


def build_turn(chat: ChatService, request: Request, raw: dict[str, Any]) -> TurnContext:
    """Validate a request into the context every brain answers from (400/404 otherwise)."""
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise ApiError(400, message, "invalid_request", param) from None
    persona = chat.personas.get(req.model)
    if persona is None:
        raise _model_not_found(chat, req.model)
    request_tools = [t.function.name for t in req.tools or ()]
    tools = ToolRunner(
        persona,
        request_tools,
        chat.settings.tool_timeout,
        services=chat.tool_services,
        choice=ToolChoice.parse(req.tool_choice),
    )
    check_request(persona, req, tools)
    ctx = TurnContext(
        request=req,
        persona=persona,
        settings=chat.settings,
        tools=tools,
        conversation_id=conversation_id_from(request.headers),
    )
    ctx.state["raw"] = raw
    ctx.state["raw_messages"] = raw.get("messages")
    ctx.state["raw_tools"] = raw.get("tools")
    ctx.state["request_id"] = request.scope.get(REQUEST_ID_SCOPE_KEY)
    facts = facts_of(request.scope)
    if facts is not None:  # the request log's persona, conversation, ttft and fallback
        facts.persona = persona.name
        facts.conversation_id = ctx.conversation_id
        facts.turn_state = ctx.state
    return ctx


def _model_not_found(chat: ChatService, model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist: it must name a persona "
        f"({', '.join(sorted(chat.personas)) or 'none loaded'}).",
        "model_not_found",
        "model",
    )


async def sse_stream(
    brain: Brain, ctx: TurnContext, enc: ChunkEncoder
) -> AsyncGenerator[bytes, None]:
    """Brain events → SSE bytes. Ends with a finish chunk and `[DONE]`, or, when the brain
    fails and the persona answers failures with errors, raises the `ApiError` that
    `EventStreamResponse` turns into an HTTP error (nothing sent yet) or an error event."""
    sent = False
    finish: Finish | None = None
    events = brain.stream(ctx)
    try:
        async for event in events:
            kind = type(event)
            if kind is TextDelta:
                if event.text:  # type: ignore[union-attr]
                    if not sent:
                        sent = True
                        _first_token(ctx)
                    yield enc.content(event.text, event.choice, event.logprobs)  # type: ignore[union-attr]
            elif kind is ToolCallDelta:
                if not sent:
                    sent = True
                    _first_token(ctx)
                call: ToolCallDelta = event  # type: ignore[assignment]
                yield enc.tool_call(call.index, call.id, call.name, call.arguments, call.choice)
            else:
                finish = event  # type: ignore[assignment]
    except Exception as exc:
        failure = classify(exc, sent)
        mode = mode_of(ctx)
        note(ctx, failure, mode, sent)
        log.warning(
            "persona %s conversation %s: brain failed (%s); %s",
            ctx.persona.name,
            ctx.conversation_id,
            exc,
            _outcome(mode, sent, failure.status),
        )
        if mode == "error":
            raise failure.api_error() from None
        if not sent:
            yield enc.content(ctx.persona.fallback_text)
        finish = Finish("stop")
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if finish is None:
        finish = Finish("stop")
    yield enc.end(finish.reason, usage_of(ctx, finish), finish.others)


def _outcome(mode: str, sent: bool, status: int) -> str:
    if mode == "error":
        return "ending the stream with an error event" if sent else f"answering {status}"
    return "ending the reply" if sent else "speaking the fallback line"


def _first_token(ctx: TurnContext) -> None:
    started = ctx.state.get("started")
    if started is not None:
        ttft = ctx.state["ttft"] = time.perf_counter() - started
        metrics.first_token(ctx.persona.name, ttft, ctx.state.get("upstream_ttft"))


async def complete(brain: Brain, ctx: TurnContext, enc: ChunkEncoder) -> dict[str, Any]:
    """A non-streamed answer: the brain's events gathered into one `chat.completion` (one
    choice per `n`). A failure answered with errors raises the `ApiError` to send."""
    texts: dict[int, list[str]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    logprobs: dict[int, dict[str, Any]] = {}
    finish = Finish("stop")
    events = brain.stream(ctx)
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                texts.setdefault(event.choice, []).append(event.text)
                if event.logprobs is not None:
                    _merge_logprobs(logprobs.setdefault(event.choice, {}), event.logprobs)
            elif isinstance(event, ToolCallDelta):
                call = calls.setdefault(event.choice, {}).setdefault(
                    event.index,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if event.id:
                    call["id"] = event.id
                if event.name:
                    call["function"]["name"] = event.name
                call["function"]["arguments"] += event.arguments
            else:
                finish = event
    except Exception as exc:
        answered = bool(texts or calls)
        failure = classify(exc, answered)
        mode = mode_of(ctx)
        note(ctx, failure, mode, answered)
        log.warning(
            "persona %s: brain failed (%s); %s",
            ctx.persona.name,
            exc,
            f"answering {failure.status}" if mode == "error" else "answering what it has",
        )
        if mode == "error":
            raise failure.api_error() from None
        if not answered:
            texts[0] = [ctx.persona.fallback_text]
        finish = Finish("stop")
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    choices = []
    for i in range(ctx.request.n or 1):
        text, choice_calls = texts.get(i, []), calls.get(i)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(text) if text or not choice_calls else None,
        }
        if choice_calls:
            message["tool_calls"] = [choice_calls[k] for k in sorted(choice_calls)]
        reason = finish.reason if i == 0 else (finish.others or {}).get(i, "stop")
        choices.append(
            {"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs.get(i)}
        )
    return {
        "id": enc.id,
        "object": "chat.completion",
        "created": enc.created,
        "model": enc.model,
        "system_fingerprint": enc.fingerprint,
        "choices": choices,
        "usage": {
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        },
    }


def _merge_logprobs(into: dict[str, Any], piece: Any) -> None:
    """Streamed `logprobs` pieces (`{"content": [...], "refusal": [...]}`) into one."""
    if not isinstance(piece, dict):
        return
    for key, value in piece.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into.setdefault(key, value)


async def chat_completions(request: Request) -> Response:
    """An OpenAI chat completion whose `model` is one of our personas (see `GET /v1/models`).

    With `"stream": true` the answer is `text/event-stream`: `chat.completion.chunk` events,
    always ending with a finish chunk (and a usage chunk if `stream_options.include_usage`)
    and `data: [DONE]`. Otherwise one `chat.completion` object. The persona's client tools,
    and tools declared in the request, come back as `tool_calls`; its server tools run here
    and never appear.

    Send the conversation id in a `conversation_id` header (or `conversation-id`,
    `x-conversation-id`), as Tavus does, and streamed requests become speculative turns: one
    whose last user message extends a running answer's cancels that answer, an identical one
    (also shortly after it ended) is sent the same answer; streamed or not, the turn is
    recorded in the conversation. If the model fails before saying anything, the persona's
    fallback line is spoken instead, or, with `on_upstream_failure: error` (the default
    without a conversation id), the answer is a 502/503/504 (an error event once a stream has
    started); `x-cvi-fallback` says which. Parameters the persona's brain does not interpret
    are forwarded to its upstream. Errors use the OpenAI error shape: 400 invalid request (or
    a parameter the persona cannot honour), 401 missing or wrong key, 404 `model_not_found`,
    413 body too large, 415 not JSON, 429 over the key's rate limit.
    """
    started = time.perf_counter()
    chat = get_chat(request)
    raw: dict[str, Any] = {}
    try:
        raw = await read_json_object(request, chat.settings.max_body_bytes)
        ctx = build_turn(chat, request, raw)
    except ApiError as exc:
        model = raw.get("model")
        metrics.request_done(
            model if isinstance(model, str) and model in chat.personas else "unknown",
            exc.status,
        )
        raise
    ctx.state["started"] = started
    brain = chat.brains[ctx.persona.name]
    enc = ChunkEncoder(ctx.request.model, fingerprint=chat.fingerprints[ctx.persona.name])
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "turn persona=%s conversation=%s stream=%s",
            ctx.persona.name,
            ctx.conversation_id,
            ctx.request.stream,
        )
    metrics.request_done(ctx.persona.name, 200)
    if ctx.request.stream:
        if ctx.conversation_id is not None:
            # Recorded by the turn tracker's observer when the subscription closes.
            return EventStreamResponse(chat.turns.open(brain, ctx, enc, started))
        return EventStreamResponse(
            sse_stream(brain, ctx, enc), start_headers=functools.partial(fallback_headers, ctx)
        )
    body = await observe_completion(chat.recorder, ctx, enc.id, complete(brain, ctx, enc))
    headers = fallback_headers(ctx)
    if headers:
        return JSONResponse(body, headers={k.decode(): v.decode() for k, v in headers})
    return JSONResponse(body)


async def chat_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """`chat_completions` as a plain ASGI endpoint (`web/direct.py` routes the chat paths to
    it): the same key check as the router's dependency, the same answers, without FastAPI's
    per-request routing and dependency machinery. An `ApiError` is answered here, as the
    app's handler would; anything else goes on to the server-error handler."""
    request = Request(scope, receive)
    try:
        await _require_key(request)
        response = await chat_completions(request)
    except ApiError as exc:
        response = exc.response()
    await response(scope, receive, send)


#: The chat paths, served by `chat_endpoint` directly (`web.direct.DirectRoutes`), each with
#: its FastAPI route (the OpenAPI description, and what the scope's `route` names).
DIRECT_ENDPOINTS: dict[tuple[str, str], tuple[ASGIApp, BaseRoute]] = {}

for _path in CHAT_PATHS:
    router.add_api_route(
        _path,
        chat_completions,
        methods=["POST"],
        responses=_ERRORS,
        openapi_extra=_BODY_DOC,
        summary="OpenAI-compatible chat completions (the persona is the model)",
        include_in_schema=_path.startswith("/v1"),
    )
    DIRECT_ENDPOINTS[("POST", _path)] = (chat_endpoint, router.routes[-1])


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cvi-agent"}


async def list_models(request: Request) -> dict[str, Any]:
    """The loaded personas in OpenAI's model-list shape: each `id` is a valid `model` for
    chat completions."""
    chat = get_chat(request)
    return {"object": "list", "data": [_model(name) for name in sorted(chat.personas)]}


async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    """One persona in OpenAI's model shape (what `client.models.retrieve(id)` reads); 404
    `model_not_found` when no persona has that name."""
    chat = get_chat(request)
    if model not in chat.personas:
        raise _model_not_found(chat, model)
    return _model(model)


for _prefix in ("/v1", ""):
    router.add_api_route(
        _prefix + "/models",
        list_models,
        methods=["GET"],
        summary="The personas, as OpenAI models",
        include_in_schema=bool(_prefix),
    )
    router.add_api_route(
        _prefix + "/models/{model}",
        retrieve_model,
        methods=["GET"],
        responses={404: {"model": ErrorResponse}},
        summary="One persona, as an OpenAI model",
        include_in_schema=bool(_prefix),
    )
