"""The upstream brain: proxies to any OpenAI-compatible model, streaming deltas through.

Client tool calls pass through with their index/id/name/argument fragments; server tool calls
are swallowed, run here, and the turn continues with their results (several rounds allowed).
Closing the generator closes the upstream stream (and its connection) at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cvi_agent import metrics
from cvi_agent.config import Settings
from cvi_agent.llm.brains.base import BrainEvent, Finish, TextDelta, ToolCallDelta, TurnContext
from cvi_agent.llm.breaker import CircuitBreaker
from cvi_agent.llm.upstream.client import ChatStreamClient
from cvi_agent.llm.upstream.errors import (
    UpstreamConnectionError,
    UpstreamDeadline,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from cvi_agent.personas import Persona

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The upstream model failed before or while answering; the message is safe to log."""


@dataclass(slots=True)
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    client_index: int | None = None


class UpstreamClients:
    """One streaming client (and so one connection pool) per upstream base URL and key.

    Shared by every persona's brain so that personas on one upstream reuse its keep-alive
    connections and share its circuit breaker; clients are created on first use. `settings`
    gives the default upstream (for personas without a `base_url`), the timeouts and the
    breaker thresholds. `ChatService.aclose` closes them all.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients: dict[tuple[str, str], ChatStreamClient] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def breaker(self, base_url: str | None, api_key: str | None) -> CircuitBreaker:
        """The circuit breaker of one upstream (shared by every persona that uses it)."""
        url = (base_url or self.settings.upstream_base_url).rstrip("/")
        key = api_key or self.settings.upstream_api_key or "not-needed"
        breaker = self._breakers.get((url, key))
        if breaker is None:
            breaker = self._breakers[(url, key)] = CircuitBreaker(
                url, self.settings.breaker_failures, self.settings.breaker_reset
            )
        return breaker

    def get(self, base_url: str | None, api_key: str | None) -> ChatStreamClient:
        """The streaming client of one upstream (None: the settings' default URL or key)."""
        url = (base_url or self.settings.upstream_base_url).rstrip("/")
        key = api_key or self.settings.upstream_api_key or "not-needed"
        client = self._clients.get((url, key))
        if client is None:
            s = self.settings
            client = ChatStreamClient(
                url,
                key,
                connect_timeout=s.upstream_connect_timeout,
                read_timeout=s.upstream_read_timeout,
                transport=s.upstream_transport,
            )
            self._clients[(url, key)] = client
        return client

    async def aclose(self) -> None:
        """Close every client and its pooled connections (at shutdown, after the brains)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _check_tool_call(index: object, call_id: object, name: object, arguments: object) -> None:
    """A tool-call fragment's fields are passed on to the caller as they are: each must have
    the type the OpenAI wire gives it (else TypeError: a malformed chunk)."""
    if type(index) is not int:
        raise TypeError("tool call index is not an integer")
    if call_id and type(call_id) is not str:
        raise TypeError("tool call id is not a string")
    if name and type(name) is not str:
        raise TypeError("tool call name is not a string")
    if type(arguments) is not str:
        raise TypeError("tool call arguments are not a string")


@dataclass(slots=True)
class _Target:
    client: ChatStreamClient
    model: str
    breaker: CircuitBreaker

    @property
    def name(self) -> str:
        return f"{self.breaker.name} ({self.model})"


class UpstreamBrain:
    """The persona's upstream, then its `fallbacks` in order, then (in the route) its spoken
    fallback line. A target is skipped while its circuit breaker is open; a target that fails
    before its first token hands the turn to the next one within the same first-token budget.

    The chain is resolved once from `persona` (API keys read from the environment variables it
    names) against the shared `clients`; the brain itself holds no per-turn state.
    """

    def __init__(self, persona: Persona, clients: UpstreamClients) -> None:
        self.persona = persona
        self.clients = clients
        cfg = persona.brain
        chain = [(cfg.base_url, cfg.model or "", cfg.api_key_env)]
        chain += [(f.base_url, f.model, f.api_key_env) for f in cfg.fallbacks]
        self.targets: list[_Target] = []
        for base_url, model, key_env in chain:
            api_key = os.environ.get(key_env, "") if key_env else None
            self.targets.append(
                _Target(clients.get(base_url, api_key), model, clients.breaker(base_url, api_key))
            )
        self.client = self.targets[0].client

    async def aclose(self) -> None:
        """Nothing of its own: the clients belong to `UpstreamClients`."""
        return None

    def _params(
        self, ctx: TurnContext, messages: list[dict[str, Any]], last_round: bool, model: str
    ) -> dict[str, Any]:
        req = ctx.request
        cfg = self.persona.brain
        params: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        temperature = req.temperature if req.temperature is not None else cfg.temperature
        if temperature is not None:
            params["temperature"] = temperature
        max_tokens = req.max_tokens or req.max_completion_tokens or cfg.max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        raw_tools = ctx.state.get("raw_tools")
        tools = ctx.tools.openai_tools(raw_tools if isinstance(raw_tools, list) else None)
        if tools:
            params["tools"] = tools
            if last_round:
                params["tool_choice"] = "none"
            elif req.tool_choice is not None:
                params["tool_choice"] = req.tool_choice
        return params

    async def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]:
        """The reply from the first target that produces a token within its share of the
        first-token budget; raises `UpstreamError` when none does (the route then speaks the
        fallback line). A reply already under way is never moved to another target: a failure
        mid-reply raises, and one that outlives the reply budget ends with `length` at the
        budget, whatever the upstream does (a timer on the stream, not a check per event)."""
        loop = asyncio.get_running_loop()
        budget = self.persona.brain.first_token_timeout or ctx.settings.upstream_first_token_timeout
        reply_budget = self.persona.brain.reply_timeout or ctx.settings.upstream_reply_timeout
        started = loop.time()
        first_deadline = started + budget
        reply_deadline = started + reply_budget
        failure: UpstreamError | None = None
        targets = self.targets
        for i, target in enumerate(targets):
            if not target.breaker.allow():
                metrics.upstream_skipped(target.breaker.name)
                failure = UpstreamError(f"circuit open for {target.name}")
                continue
            remaining = first_deadline - loop.time()
            if remaining <= 0.001:
                break
            # Leave a fair share of the first-token budget to the targets after this one.
            later = sum(1 for t in targets[i + 1 :] if t.breaker.state != "open")
            attempt = remaining / (later + 1)
            emitted = False
            cut: str | None = None  # why the reply budget ran out (the error's text: no cycle)
            events = self._stream_target(ctx, target, attempt, reply_deadline)
            try:
                async for event in events:
                    if not emitted and type(event) is not Finish:
                        emitted = True
                        target.breaker.success()
                    if type(event) is Finish and not emitted:
                        raise UpstreamError(f"{target.name} sent an empty reply")
                    yield event
                return
            except UpstreamDeadline as exc:
                if not emitted:  # a reply budget shorter than the first-token one: spent
                    target.breaker.failure()
                    metrics.upstream_failed(target.breaker.name)
                    failure = UpstreamError(
                        f"{target.name} said nothing within the reply budget of {reply_budget:g}s"
                    )
                    break
                cut = str(exc)
            except UpstreamError as exc:
                target.breaker.failure()
                metrics.upstream_failed(target.breaker.name)
                if emitted:
                    raise
                failure = exc
                log.warning(
                    "persona %s: %s failed before its first token (%s)%s",
                    self.persona.name,
                    target.name,
                    exc,
                    "; trying the next upstream" if i < len(targets) - 1 else "",
                )
            finally:
                await events.aclose()  # type: ignore[attr-defined]
            if cut is not None:
                log.warning(
                    "persona %s: reply from %s exceeded %gs (%s); ending it",
                    self.persona.name,
                    target.name,
                    reply_budget,
                    cut,
                )
                yield Finish("length")
                return
        try:
            raise failure or UpstreamError(f"no first token within {budget:g}s")
        finally:
            failure = None  # its traceback holds this frame, which must not hold it back

    async def _stream_target(
        self, ctx: TurnContext, target: _Target, first_token_timeout: float, reply_deadline: float
    ) -> AsyncIterator[BrainEvent]:
        """One target's reply, every tool round of it; raises `UpstreamDeadline` at
        `reply_deadline` (the loop's clock) and `UpstreamError` on any failure, a malformed
        chunk included: only well-formed strings reach the caller."""
        loop = asyncio.get_running_loop()
        messages: list[dict[str, Any]] = list(
            ctx.state.get("raw_messages")
            or [m.model_dump(exclude_none=True) for m in ctx.request.messages]
        )
        max_rounds = max(1, ctx.settings.max_tool_rounds)
        prompt_tokens = completion_tokens = 0
        next_client_index = 0
        first_at: float | None = None
        for round_no in range(max_rounds + 1):
            params = self._params(ctx, messages, round_no == max_rounds, target.model)
            calls: dict[int, _Call] = {}
            text_parts: list[str] = []
            finish_reason = "stop"
            # A later round (after server tools) may have less than a first-token budget left.
            deadline = min(loop.time() + first_token_timeout, reply_deadline)
            if deadline <= loop.time():
                raise UpstreamDeadline("the budget was spent before this tool round")
            sent_at = time.perf_counter()
            try:
                async with asyncio.timeout_at(deadline):
                    stream = await target.client.stream(params)
            except TimeoutError as exc:
                if deadline == reply_deadline:
                    raise UpstreamDeadline("the upstream had not answered yet") from exc
                raise UpstreamError(
                    f"no answer from upstream within {first_token_timeout:g}s"
                ) from exc
            except UpstreamHTTPError as exc:
                raise UpstreamError(f"upstream answered HTTP {exc.status}: {exc.message}") from exc
            except UpstreamConnectionError as exc:
                raise UpstreamError(f"upstream request failed: {exc}") from exc
            stream.expire_at(reply_deadline)
            try:
                async with stream:
                    got_first = False
                    deadline_cm = asyncio.timeout_at(deadline)
                    async with deadline_cm:
                        async for chunk in stream:
                            if not got_first:
                                got_first = True
                                deadline_cm.reschedule(None)
                            if type(chunk) is not dict:
                                raise UpstreamError("upstream sent a chunk that is not an object")
                            error = chunk.get("error")
                            if error:
                                raise UpstreamError(f"upstream error event: {error}")
                            usage = chunk.get("usage")
                            if usage:
                                prompt_tokens += usage.get("prompt_tokens") or 0
                                completion_tokens += usage.get("completion_tokens") or 0
                            choices = chunk.get("choices")
                            if not choices:
                                continue
                            choice = choices[0]
                            delta = choice.get("delta")
                            if delta:
                                content = delta.get("content")
                                tool_calls = delta.get("tool_calls")
                                if first_at is None and (content or tool_calls):
                                    first_at = time.perf_counter()
                                    ctx.state["upstream_ttft"] = first_at - sent_at
                                if content:
                                    if type(content) is not str:
                                        raise TypeError("content is not a string")
                                    text_parts.append(content)
                                    yield TextDelta(content)
                                for tc in tool_calls or ():
                                    index = tc.get("index", 0)
                                    fn = tc.get("function") or {}
                                    call_id = tc.get("id")
                                    name = fn.get("name")
                                    fragment = fn.get("arguments") or ""
                                    _check_tool_call(index, call_id, name, fragment)
                                    call = calls.get(index)
                                    if call is None:
                                        call = calls[index] = _Call()
                                    if call_id:
                                        call.id = call_id
                                    if name:
                                        call.name = name
                                    if ctx.tools.is_server(call.name):
                                        call.arguments.append(fragment)
                                        continue
                                    if call.client_index is None:
                                        call.client_index = next_client_index
                                        next_client_index += 1
                                        metrics.tool_call(
                                            ctx.tools.metric_label(call.name), "client", "streamed"
                                        )
                                        yield ToolCallDelta(
                                            call.client_index,
                                            call.id or None,
                                            call.name or None,
                                            fragment,
                                        )
                                    else:
                                        yield ToolCallDelta(call.client_index, None, None, fragment)
                            reason = choice.get("finish_reason")
                            if reason:
                                if type(reason) is not str:
                                    raise TypeError("finish_reason is not a string")
                                finish_reason = reason
            except TimeoutError as exc:
                if deadline == reply_deadline:
                    raise UpstreamDeadline("the upstream had sent no token yet") from exc
                raise UpstreamError(
                    f"no first token from upstream within {first_token_timeout:g}s"
                ) from exc
            except UpstreamTimeout as exc:
                raise UpstreamError(f"upstream stream stalled: {exc}") from exc
            except UpstreamConnectionError as exc:
                raise UpstreamError(f"upstream stream failed: {exc}") from exc
            except (AttributeError, TypeError, KeyError, IndexError) as exc:
                what = str(exc) if type(exc) is TypeError else f"{type(exc).__name__}: {exc}"
                raise UpstreamError(f"upstream sent a malformed chunk: {what}") from exc

            server_calls = [c for c in calls.values() if ctx.tools.is_server(c.name)]
            client_calls = [c for c in calls.values() if c.client_index is not None]
            if client_calls:
                if server_calls:
                    log.warning(
                        "upstream mixed server and client tool calls; forwarding only the client calls"
                    )
                yield Finish("tool_calls", prompt_tokens, completion_tokens)
                return
            if not server_calls or round_no == max_rounds:
                if finish_reason == "tool_calls":
                    finish_reason = "stop"
                yield Finish(finish_reason, prompt_tokens, completion_tokens)
                return
            results = await asyncio.gather(
                *(
                    ctx.tools.run(
                        c.name,
                        "".join(c.arguments),
                        c.id,
                        ctx.conversation_id,
                        side_effects_allowed=ctx.side_effects_allowed,
                    )
                    for c in server_calls
                )
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": "".join(text_parts) or None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": "".join(c.arguments)},
                        }
                        for c in server_calls
                    ],
                }
            )
            for result in results:
                messages.append(
                    {"role": "tool", "tool_call_id": result.call_id, "content": result.output}
                )
        yield Finish("stop", prompt_tokens, completion_tokens)
