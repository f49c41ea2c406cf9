"""What a brain can honour of a request, checked once before any work starts.

A parameter the persona's brain cannot honour is a 400 that names it, never a silent drop: a
flow or echo persona has no model, so it cannot give several choices (`n` > 1), token
`logprobs` or a structured `response_format`. `tool_choice` must name a tool the turn can
call, and `required` needs one (as OpenAI's API answers). Everything else an upstream persona
forwards as it came (llm/brains/upstream.py). A few attribute reads per request.
"""

from __future__ import annotations

from cvi_agent.llm.tools import ToolRunner
from cvi_agent.personas import Persona
from cvi_agent.protocol.chat import ChatCompletionRequest
from cvi_agent.web.errors import ApiError


def _unsupported(persona: Persona, param: str, what: str) -> ApiError:
    return ApiError(
        400,
        f"{param}: {what} is not supported by the persona {persona.name!r}: its "
        f"{persona.brain.kind} brain has no model (use an upstream persona).",
        "unsupported_parameter",
        param,
    )


def check_request(persona: Persona, req: ChatCompletionRequest, tools: ToolRunner) -> None:
    """Raise the 400 for the first parameter of `req` that `persona`'s brain cannot honour."""
    choice = tools.choice
    if choice.mode in ("required", "function"):
        names = tools.callable_names()
        if not names:
            raise ApiError(
                400,
                f"tool_choice: {choice.name or choice.mode!r} needs a tool, and this turn has "
                "none (the request declares no tools and the persona has no server tools).",
                "invalid_value",
                "tool_choice",
            )
        if choice.name is not None and choice.name not in names:
            raise ApiError(
                400,
                f"tool_choice: no tool named {choice.name!r} in this turn (the request's "
                f"tools and the persona's server tools: {', '.join(names)}).",
                "invalid_value",
                "tool_choice",
            )
    if persona.brain.kind == "upstream":
        return
    if choice.mode == "other":
        raise _unsupported(persona, "tool_choice", "this kind of tool_choice")
    if req.n is not None and req.n > 1:
        raise _unsupported(persona, "n", "more than one choice")
    if req.logprobs:
        raise _unsupported(persona, "logprobs", "token log probabilities")
    if req.top_logprobs:
        raise _unsupported(persona, "top_logprobs", "token log probabilities")
    response_format = req.response_format
    if response_format is not None and response_format.get("type", "text") != "text":
        raise _unsupported(persona, "response_format", "a structured response format")
