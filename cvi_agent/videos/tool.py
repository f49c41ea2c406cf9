"""The `create_video` server tool: commission an avatar video mid-call.

A persona enables it in its YAML (`handler: create_video`, `side_effects: true`) with
`options: {provider, avatar, voice, on_ready, …}`; the model supplies the script (and
optionally a title). The tool creates the video with a tight deadline and answers at once
(`queued`/`rendering` with the video id), so the conversation flows on; webhooks and the poller
finish the job, and `on_ready` decides how the live conversation hears about it.

It is declared side-effecting: it never runs inside a speculative generation
(`SideEffectsNotAllowed`), so an abandoned draft of a turn cannot order a video.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cvi_agent.llm.tools import ToolCallContext, ToolError, builtin
from cvi_agent.personas import Persona
from cvi_agent.videos.announce import DEFAULT_ON_READY, ON_READY
from cvi_agent.videos.base import PROVIDERS, ProviderError, ProviderNotConfigured
from cvi_agent.videos.service import VideoService

log = logging.getLogger(__name__)

NAME = "create_video"
DEFAULT_CREATE_TIMEOUT = 4.0
MAX_SCRIPT_CHARS = 5000
QUEUED_MESSAGE = "I've started making your video. I'll let you know when it's ready."

# Option keys the tool understands; everything else under `options.extra` goes to the provider.
OPTION_KEYS = frozenset(
    {
        "provider",
        "avatar",
        "voice",
        "title",
        "on_ready",
        "ready_text",
        "ready_context",
        "queued_text",
        "create_timeout",
        "extra",
    }
)


def check_options(options: dict[str, Any]) -> list[str]:
    """Problems with a persona's `create_video` options, as readable lines."""
    problems = []
    provider = options.get("provider")
    if provider not in PROVIDERS:
        problems.append(f"options.provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if not options.get("avatar"):
        problems.append("options.avatar is required (a replica id, avatarId or avatar_id)")
    on_ready = options.get("on_ready", DEFAULT_ON_READY)
    if on_ready not in ON_READY:
        problems.append(f"options.on_ready must be one of {', '.join(ON_READY)}, got {on_ready!r}")
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        problems.append(f"unknown options {', '.join(unknown)} (provider fields go under extra)")
    if "extra" in options and not isinstance(options["extra"], dict):
        problems.append("options.extra must be a mapping")
    return problems


@builtin(NAME, side_effects=True)
async def create_video(args: dict[str, Any], ctx: ToolCallContext) -> dict[str, Any]:
    """Start rendering an avatar video of `script`; answer with its id before it is ready."""
    options = ctx.spec.options
    problems = check_options(options)
    if problems:
        log.error("persona %s: create_video misconfigured: %s", ctx.persona.name, problems)
        raise ToolError("Sorry, video creation isn't set up correctly for this persona.")
    service = ctx.services.get("videos")
    if not isinstance(service, VideoService):
        raise ToolError("Sorry, I can't make videos on this server.")
    script = " ".join(str(args.get("script") or "").split())
    if not script:
        raise ToolError("I need the words the video should say.")
    if len(script) > MAX_SCRIPT_CHARS:
        raise ToolError(f"The script is too long (at most {MAX_SCRIPT_CHARS} characters).")
    title = str(args.get("title") or options.get("title") or "").strip()[:200] or None
    provider = str(options["provider"])
    spec_timeout = ctx.spec.timeout or 5.0
    budget = min(float(options.get("create_timeout", DEFAULT_CREATE_TIMEOUT)), spec_timeout * 0.9)
    meta = {
        "persona": ctx.persona.name,
        "tool_call_id": ctx.call_id,
        "on_ready": options.get("on_ready", DEFAULT_ON_READY),
        "ready_text": options.get("ready_text"),
        "ready_context": options.get("ready_context"),
    }
    try:
        async with asyncio.timeout(budget):
            video = await service.create(
                provider,
                avatar=str(options["avatar"]),
                voice=str(options["voice"]) if options.get("voice") else None,
                script=script,
                title=title,
                conversation_id=ctx.conversation_id,
                extra=options.get("extra") or {},
                meta={k: v for k, v in meta.items() if v is not None},
            )
    except TimeoutError:
        log.warning("create_video: %s did not answer within %.1fs", provider, budget)
        raise ToolError(
            "Sorry, the video service didn't answer in time. Please ask me again in a moment."
        ) from None
    except ProviderNotConfigured as exc:
        log.error("create_video: %s", exc)
        raise ToolError("Sorry, video creation isn't set up on this server.") from exc
    except ProviderError as exc:
        log.warning("create_video: %s", exc)
        if exc.retryable:
            raise ToolError(
                "Sorry, the video service is busy right now. Please ask me again in a moment."
            ) from exc
        raise ToolError("Sorry, the video service refused the request.") from exc
    return {
        "status": "queued",
        "provider_status": video.status,
        "video_id": video.video_id,
        "provider": video.provider,
        "title": title,
        "message": str(options.get("queued_text") or QUEUED_MESSAGE),
    }


def validate_video_tools(persona: Persona) -> list[str]:
    """Problems with a persona's `create_video` tools (checked when personas load)."""
    return [
        f"{persona.source or persona.name}: tools.{spec.name}: {problem}"
        for spec in persona.tools
        if spec.execution == "server" and (spec.handler or spec.name) == NAME
        for problem in check_options(spec.options)
    ]
