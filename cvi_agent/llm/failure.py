"""What a caller gets when a turn's brain fails (its upstream, in practice): the persona's
spoken fallback line, or an OpenAI error its own retries and fallbacks understand.

`on_upstream_failure` (persona YAML): `speak` answers 200 with `fallback_text` (or ends a reply
already under way cleanly), which is right for a live Tavus call where silence is the worst
outcome; `error` answers 502 (the upstream failed), 503 (unreachable, every circuit breaker
open) or 504 (no first token within the budget) in the OpenAI error shape, or, once a stream
has started, an error event and `[DONE]`, so the OpenAI SDKs retry and LiteLLM or LangChain
fall back. Unset, it is `speak` when the request carries a Tavus conversation id and `error`
otherwise. Either way the response says so in `x-cvi-fallback` (when its headers had not gone
out yet) and the turn's record in its `fallback` fields, with the cause in `error` (one line,
any key masked), and `cvi_turn_fallbacks` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cvi_agent import metrics
from cvi_agent.llm.brains.upstream import UpstreamError, UpstreamTimedOut, UpstreamUnavailable
from cvi_agent.llm.upstream.errors import UpstreamHTTPError, UpstreamTimeout, mask_keys
from cvi_agent.protocol.redact import redact_text
from cvi_agent.web.errors import ApiError

if TYPE_CHECKING:
    from cvi_agent.llm.brains.base import TurnContext

FALLBACK_HEADER = "x-cvi-fallback"
Mode = Literal["speak", "error"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a turn's brain failed, as the caller is told.

    Args:
        status: the HTTP status an `error` answer has (502, 503, 504; 500 for a bug).
        code: the error's `code` and the `x-cvi-fallback` value: `upstream_error`,
            `upstream_unavailable`, `upstream_timeout` or `internal_error`.
        message: what the caller reads; never the upstream's own text (it may name hosts or
            echo key fragments), only what kind of failure it was.
        cause: what went wrong, for the operator (the turn's record and the log): one line,
            credentials masked, e.g. `upstream unreachable: could not connect to
            api.openai.com:443: connection refused` or `upstream 401: Incorrect API key …`.
    """

    status: int
    code: str
    message: str
    cause: str = ""

    def api_error(self) -> ApiError:
        """The failure as an OpenAI error response (with the fallback header)."""
        return ApiError(self.status, self.message, self.code, headers={FALLBACK_HEADER: self.code})


def cause_of(exc: BaseException) -> str:
    """What an exception raised by a brain says went wrong: one line of at most 300
    characters, with anything shaped like a credential masked."""
    text = str(exc) if isinstance(exc, UpstreamError) else f"{type(exc).__name__}: {exc}"
    text = mask_keys(redact_text(text))
    return text if len(text) <= 300 else text[:299] + "…"


def classify(exc: BaseException, mid_reply: bool = False) -> Failure:
    """The failure an exception raised by a brain stands for; `mid_reply`: part of the reply
    had been produced (the upstream was reached, then broke off or stalled)."""
    failure = _classify(exc, mid_reply)
    return Failure(failure.status, failure.code, failure.message, cause_of(exc))


def _classify(exc: BaseException, mid_reply: bool) -> Failure:
    if not isinstance(exc, UpstreamError):
        return Failure(500, "internal_error", "The persona failed to answer.")
    cause = exc.__cause__
    if isinstance(exc, UpstreamTimedOut) or isinstance(cause, TimeoutError | UpstreamTimeout):
        return Failure(
            504, "upstream_timeout", "The persona's model did not answer in time; retry."
        )
    if mid_reply:
        return Failure(502, "upstream_error", "The persona's model broke off its answer; retry.")
    if isinstance(exc, UpstreamUnavailable):
        return Failure(
            503, "upstream_unavailable", "The persona's model is unreachable right now; retry."
        )
    if isinstance(cause, UpstreamHTTPError):
        return Failure(
            502, "upstream_error", f"The persona's model answered HTTP {cause.status}; retry."
        )
    return Failure(502, "upstream_error", "The persona's model failed to answer; retry.")


def mode_of(ctx: TurnContext) -> Mode:
    """The persona's `on_upstream_failure`, or its default for this request."""
    mode = ctx.persona.on_upstream_failure
    if mode is not None:
        return mode
    return "speak" if ctx.conversation_id is not None else "error"


def note(ctx: TurnContext, failure: Failure, mode: Mode, mid_reply: bool) -> None:
    """Leave the failure in the turn's state, where the record and the headers read it (the
    cause in `error`), and count it in `cvi_turn_fallbacks`."""
    ctx.state["fallback"] = (failure.code, mode, mid_reply)
    ctx.state["error"] = failure.cause
    metrics.turn_fallback(ctx.persona.name, failure.code)


def fallback_headers(ctx: TurnContext) -> list[tuple[bytes, bytes]]:
    """`x-cvi-fallback: <code>` when the turn fell back before its headers went out."""
    noted = ctx.state.get("fallback")
    if noted is None:
        return []
    return [(FALLBACK_HEADER.encode(), noted[0].encode())]
