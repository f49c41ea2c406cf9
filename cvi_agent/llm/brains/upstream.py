"""The upstream brain: proxies to any OpenAI-compatible model, streaming deltas through.

The upstream request is the caller's own: every parameter this brain does not interpret
(`response_format`, `stop`, `seed`, `n`, `logprobs`, anything added later) is forwarded as it
came, over the persona's `brain.extra_body`, over its `temperature` and `max_tokens`. The
tools sent are the turn's (llm/tools.py): the request's, then the persona's server tools it
does not shadow. Client tool calls pass through with their index/id/name/argument fragments;
server tool calls are swallowed, run here, and the turn continues with their results (several
rounds allowed); a call the turn may not make (undeclared, or against `tool_choice` /
`parallel_tool_calls`) is dropped. Closing the generator closes the upstream stream (and its
connection) at once.
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


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be asked: its circuit breaker is open, or the request got no
    response at all (connection refused or reset)."""


class UpstreamTimedOut(UpstreamError):
    """The first-token budget ran out before any upstream answered."""


# Request keys this brain sets itself; every other one is forwarded as the request sent it.
_CONSUMED = frozenset(
    {"model", "messages", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls"}
)


@dataclass(slots=True)
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    client_index: int | None = None
    fate: str | None = None  # server | client | drop, decided once its name is known


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
    missing_key: str | None = None  # the setting to set when no API key is configured

    @property
    def name(self) -> str:
        return f"{self.breaker.name} ({self.model})"

    def http_error(self, exc: UpstreamHTTPError) -> UpstreamError:
        """The turn's error for an HTTP error answer; a refusal without any key says which
        setting would hold it."""
        hint = ""
        if exc.status in (401, 403) and self.missing_key:
            hint = f" (no API key is configured for this upstream: set {self.missing_key})"
        return UpstreamError(f"upstream {exc.status}: {exc.message}{hint}")


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
            missing = None
            if not (api_key or clients.settings.upstream_api_key):
                missing = (
                    f"{key_env} or CVI_UPSTREAM_API_KEY" if key_env else "CVI_UPSTREAM_API_KEY"
                )
            self.targets.append(
                _Target(
                    clients.get(base_url, api_key),
                    model,
                    clients.breaker(base_url, api_key),
                    missing,
                )
            )
        self.client = self.targets[0].client
        # The persona's defaults, under whatever the request sends (computed once).
        defaults: dict[str, Any] = {}
        if cfg.temperature is not None:
            defaults["temperature"] = cfg.temperature
        if cfg.max_tokens is not None and "max_completion_tokens" not in cfg.extra_body:
            defaults["max_tokens"] = cfg.max_tokens
        defaults.update(cfg.extra_body)
        self._defaults = defaults

    async def aclose(self) -> None:
        """Nothing of its own: the clients belong to `UpstreamClients`."""
        return None

    def _tools(self, ctx: TurnContext, server: bool = True) -> list[dict[str, Any]]:
        raw_tools = ctx.state.get("raw_tools")
        return ctx.tools.openai_tools(raw_tools if isinstance(raw_tools, list) else None, server)

    def _params(
        self,
        ctx: TurnContext,
        messages: list[dict[str, Any]],
        round_no: int,
        last_round: bool,
        model: str,
        tools: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The upstream request of one round: the caller's parameters over the persona's
        defaults, with the turn's messages and tools."""
        raw: dict[str, Any] = ctx.state.get("raw") or {}
        params = dict(self._defaults)
        for key, value in raw.items():
            if value is not None and key not in _CONSUMED:
                params[key] = value
        if raw.get("max_completion_tokens") is not None and raw.get("max_tokens") is None:
            params.pop("max_tokens", None)  # the request's own limit, under its own name
        params["model"] = model
        params["messages"] = messages
        params["stream"] = True
        options = raw.get("stream_options")
        params["stream_options"] = (
            {**options, "include_usage": True}
            if isinstance(options, dict) and options
            else {"include_usage": True}
        )
        if tools:
            params["tools"] = tools
            choice = ctx.tools.choice
            if last_round:
                params["tool_choice"] = "none"
            elif round_no and choice.mode in ("required", "function"):
                params["tool_choice"] = "auto"  # the forced call was made (a server tool)
            elif raw.get("tool_choice") is not None:
                params["tool_choice"] = raw["tool_choice"]
            if raw.get("parallel_tool_calls") is not None:
                params["parallel_tool_calls"] = raw["parallel_tool_calls"]
        return params

    def _fate(self, ctx: TurnContext, call: _Call, clients_so_far: int) -> str:
        """What becomes of an upstream tool call, decided once its name is known."""
        tools = ctx.tools
        name = call.name
        if not tools.may_call(name):
            label = tools.metric_label(name)
            if "dropped_call" not in ctx.state:  # once a turn: a model can call anything
                ctx.state["dropped_call"] = label
                log.warning(
                    "persona %s: the upstream called %s, which this turn may not call "
                    "(not declared, or against tool_choice); dropped",
                    self.persona.name,
                    label,
                )
            metrics.tool_call(label, "client", "dropped")
            return "drop"
        if tools.is_server(name):
            return "server"
        if clients_so_far and ctx.request.parallel_tool_calls is False:
            metrics.tool_call(tools.metric_label(name), "client", "dropped")
            return "drop"  # parallel_tool_calls: false, and the model made a second call
        return "client"

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
                failure = UpstreamUnavailable(
                    f"circuit open for {target.name}, last failure: {target.breaker.last_error}"
                )
                continue
            remaining = first_deadline - loop.time()
            if remaining <= 0.001:
                break
            # Leave a fair share of the first-token budget to the targets after this one.
            later = sum(1 for t in targets[i + 1 :] if t.breaker.state != "open")
            attempt = remaining / (later + 1)
            emitted = False
            cut: str | None = None  # why the reply budget ran out (the error's text: no cycle)
            events = (
                self._stream_choices(ctx, target, attempt, reply_deadline)
                if (ctx.request.n or 1) > 1
                else self._stream_target(ctx, target, attempt, reply_deadline)
            )
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
                    failure = UpstreamTimedOut(
                        f"{target.name} said nothing within the reply budget of {reply_budget:g}s"
                    )
                    target.breaker.failure(str(failure))
                    metrics.upstream_failed(target.breaker.name)
                    break
                cut = str(exc)
            except UpstreamError as exc:
                target.breaker.failure(str(exc))
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
                n = ctx.request.n or 1
                yield Finish("length", others={c: "length" for c in range(1, n)} if n > 1 else None)
                return
        try:
            raise failure or UpstreamTimedOut(f"no first token within {budget:g}s")
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
        want_logprobs = bool(ctx.request.logprobs)
        tools = self._tools(ctx)
        for round_no in range(max_rounds + 1):
            params = self._params(
                ctx, messages, round_no, round_no == max_rounds, target.model, tools
            )
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
                raise target.http_error(exc) from exc
            except UpstreamConnectionError as exc:
                raise UpstreamUnavailable(f"upstream unreachable: {exc}") from exc
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
                            prompt, completion = _checked_usage(chunk)
                            prompt_tokens += prompt
                            completion_tokens += completion
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
                                    if want_logprobs:
                                        yield TextDelta(content, 0, choice.get("logprobs"))
                                    else:
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
                                    if call.fate is None:
                                        if not call.name:  # wait for the name
                                            call.arguments.append(fragment)
                                            continue
                                        call.fate = self._fate(ctx, call, next_client_index)
                                    if call.fate != "client":
                                        if call.fate == "server":
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
                                            call.name,
                                            "".join(call.arguments) + fragment,
                                        )
                                    else:
                                        yield ToolCallDelta(call.client_index, None, None, fragment)
                            reason = choice.get("finish_reason")
                            if reason:
                                if type(reason) is not str:
                                    raise TypeError("finish_reason is not a string")
                                finish_reason = reason
            except _STREAM_ERRORS as exc:
                raise _stream_error(exc, deadline == reply_deadline, first_token_timeout) from exc

            server_calls = [c for c in calls.values() if c.fate == "server"]
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

    async def _stream_choices(
        self, ctx: TurnContext, target: _Target, first_token_timeout: float, reply_deadline: float
    ) -> AsyncIterator[BrainEvent]:
        """`n` > 1: every choice relayed under its own index, in one round. The persona's
        server tools are not offered then (each choice would need its own tool round), so
        the tools are the request's and every call goes back to the caller."""
        messages: list[dict[str, Any]] = list(
            ctx.state.get("raw_messages")
            or [m.model_dump(exclude_none=True) for m in ctx.request.messages]
        )
        params = self._params(ctx, messages, 0, False, target.model, self._tools(ctx, False))
        want_logprobs = bool(ctx.request.logprobs)
        calls: dict[tuple[int, int], _Call] = {}
        next_index: dict[int, int] = {}
        reasons: dict[int, str] = {}
        prompt_tokens = completion_tokens = 0
        deadline = min(asyncio.get_running_loop().time() + first_token_timeout, reply_deadline)
        sent_at = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                stream = await target.client.stream(params)
        except TimeoutError as exc:
            if deadline == reply_deadline:
                raise UpstreamDeadline("the upstream had not answered yet") from exc
            raise UpstreamError(f"no answer from upstream within {first_token_timeout:g}s") from exc
        except UpstreamHTTPError as exc:
            raise target.http_error(exc) from exc
        except UpstreamConnectionError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc}") from exc
        stream.expire_at(reply_deadline)
        try:
            async with stream:
                deadline_cm = asyncio.timeout_at(deadline)
                async with deadline_cm:
                    async for chunk in stream:
                        deadline_cm.reschedule(None)
                        prompt, completion = _checked_usage(chunk)
                        prompt_tokens += prompt
                        completion_tokens += completion
                        for choice in chunk.get("choices") or ():
                            ci = choice.get("index") or 0
                            if type(ci) is not int:
                                raise TypeError("choice index is not an integer")
                            delta = choice.get("delta")
                            if delta:
                                content = delta.get("content")
                                if "upstream_ttft" not in ctx.state:
                                    ctx.state["upstream_ttft"] = time.perf_counter() - sent_at
                                if content:
                                    if type(content) is not str:
                                        raise TypeError("content is not a string")
                                    logprobs = choice.get("logprobs") if want_logprobs else None
                                    yield TextDelta(content, ci, logprobs)
                                for tc in delta.get("tool_calls") or ():
                                    index = tc.get("index", 0)
                                    fn = tc.get("function") or {}
                                    call_id = tc.get("id")
                                    name = fn.get("name")
                                    fragment = fn.get("arguments") or ""
                                    _check_tool_call(index, call_id, name, fragment)
                                    key = (ci, index)
                                    call = calls.get(key)
                                    if call is None:
                                        call = calls[key] = _Call()
                                    if call_id:
                                        call.id = call_id
                                    if name:
                                        call.name = name
                                    if call.fate is None:
                                        if not call.name:
                                            call.arguments.append(fragment)
                                            continue
                                        call.fate = self._fate(ctx, call, next_index.get(ci, 0))
                                    if call.fate != "client":
                                        continue
                                    if call.client_index is None:
                                        call.client_index = next_index.get(ci, 0)
                                        next_index[ci] = call.client_index + 1
                                        metrics.tool_call(
                                            ctx.tools.metric_label(call.name), "client", "streamed"
                                        )
                                        yield ToolCallDelta(
                                            call.client_index,
                                            call.id or None,
                                            call.name,
                                            "".join(call.arguments) + fragment,
                                            ci,
                                        )
                                    else:
                                        yield ToolCallDelta(
                                            call.client_index, None, None, fragment, ci
                                        )
                            reason = choice.get("finish_reason")
                            if reason:
                                if type(reason) is not str:
                                    raise TypeError("finish_reason is not a string")
                                reasons[ci] = reason
        except _STREAM_ERRORS as exc:
            raise _stream_error(exc, deadline == reply_deadline, first_token_timeout) from exc

        def reason_of(ci: int) -> str:
            reason = reasons.get(ci, "stop")
            return "stop" if reason == "tool_calls" and ci not in next_index else reason

        n = ctx.request.n or 1
        yield Finish(
            reason_of(0),
            prompt_tokens,
            completion_tokens,
            {ci: reason_of(ci) for ci in range(1, n)},
        )


# What reading an upstream stream can raise, and what each means for the turn.
_STREAM_ERRORS = (
    TimeoutError,
    UpstreamTimeout,
    UpstreamConnectionError,
    AttributeError,
    TypeError,
    KeyError,
    IndexError,
)


def _stream_error(exc: Exception, at_reply_deadline: bool, first_token_timeout: float) -> Exception:
    """The turn's error for `exc` raised while reading the upstream: the reply budget spent
    before any token, no first token in time, a stalled or broken stream, a malformed chunk."""
    if isinstance(exc, TimeoutError):
        if at_reply_deadline:
            return UpstreamDeadline("the upstream had sent no token yet")
        return UpstreamError(f"no first token from upstream within {first_token_timeout:g}s")
    if isinstance(exc, UpstreamTimeout):
        return UpstreamError(f"upstream stream stalled: {exc}")
    if isinstance(exc, UpstreamConnectionError):
        return UpstreamError(f"upstream stream failed: {exc}")
    what = str(exc) if type(exc) is TypeError else f"{type(exc).__name__}: {exc}"
    return UpstreamError(f"upstream sent a malformed chunk: {what}")


_NO_USAGE = (0, 0)


def _checked_usage(chunk: Any) -> tuple[int, int]:
    """The checks every upstream chunk passes, on the single-choice and the n > 1 paths alike:
    an object, not an error event. Returns the (prompt, completion) tokens its `usage` reports."""
    if type(chunk) is not dict:
        raise UpstreamError("upstream sent a chunk that is not an object")
    error = chunk.get("error")
    if error:
        raise UpstreamError(f"upstream error event: {error}")
    usage = chunk.get("usage")
    if not usage:
        return _NO_USAGE
    return usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
