"""`cvi-agent personas list|validate|push`: the persona files, checked as the server checks
them, and pushed to Tavus (TAVUS_API_KEY) with our LLM endpoint as their custom LLM.

The runtime and the Tavus client are imported inside the commands that use them (not to dodge
a cycle: the CLI is the top layer) so that building the parser, and `cvi-agent --help`, stay
fast."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from cvi_agent.config import Settings, ensure_dev_key, mask_key
from cvi_agent.personas import PersonaError


def add_personas_parser(sub: Any) -> None:
    """Register `personas` on the top-level parser."""
    personas = sub.add_parser("personas", help="list, validate, or push personas to Tavus")
    personas.add_argument(
        "action",
        choices=["list", "validate", "push"],
        help="list them, validate them (as the server does), or push them to Tavus",
    )
    personas.add_argument("--dir", default=None, help="default: $CVI_PERSONAS_DIR or ./personas")
    add_push_arguments(personas)
    personas.set_defaults(func=cmd_personas)


def add_push_arguments(personas_parser: argparse.ArgumentParser) -> None:
    personas_parser.add_argument("name", nargs="?", default=None, help="push: one persona only")
    personas_parser.add_argument("--replica-id", default=None, help="push: default_replica_id")
    personas_parser.add_argument(
        "--public-url", default=None, help="push: how Tavus reaches us (default $CVI_PUBLIC_URL)"
    )


def cmd_personas(args: argparse.Namespace) -> int:
    from cvi_agent.runtime import load_checked_personas

    settings = Settings()
    if args.dir:
        settings.personas_dir = Path(args.dir)
    try:
        personas = load_checked_personas(settings)
    except PersonaError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.action == "push":
        return cmd_personas_push(args, personas, settings)
    if args.action == "validate":
        print(f"{len(personas)} persona(s) valid in {settings.personas_dir}")
        return 0
    width = max((len(n) for n in personas), default=4)
    for name in sorted(personas):
        p = personas[name]
        tools = ", ".join(f"{t.name}({t.execution})" for t in p.tools) or "-"
        model = f" model={p.brain.model}" if p.brain.model else ""
        print(f"{name:<{width}}  {p.brain.kind:<8} {p.persona_name}{model}  tools: {tools}")
    return 0


def cmd_personas_push(
    args: argparse.Namespace, personas: dict[str, Any], settings: Settings
) -> int:
    from cvi_agent.tavus.client import TavusClient, TavusError

    if not settings.tavus_api_key:
        print("cvi-agent: set TAVUS_API_KEY to push personas to Tavus", file=sys.stderr)
        return 2
    names = [args.name] if args.name else sorted(personas)
    unknown = [n for n in names if n not in personas]
    if unknown:
        print(
            f"cvi-agent: no persona {unknown[0]!r} ({', '.join(sorted(personas))})", file=sys.stderr
        )
        return 2
    generated = ensure_dev_key(settings)
    if generated:
        print(
            "cvi-agent: warning: no CVI_API_KEYS; pushing the development key "
            f"({mask_key(generated)}) as the persona's LLM key",
            file=sys.stderr,
        )
    public_url = args.public_url or settings.public_url
    if "127.0.0.1" in public_url or "localhost" in public_url:
        print(
            f"cvi-agent: warning: CVI_PUBLIC_URL is {public_url}; Tavus cannot reach that",
            file=sys.stderr,
        )

    async def push() -> int:
        async with TavusClient(settings.tavus_api_key, settings.tavus_api_url) as tavus:
            for name in names:
                try:
                    result = await tavus.push_persona(
                        personas[name], public_url, settings.api_keys[0], args.replica_id
                    )
                except TavusError as exc:
                    print(f"cvi-agent: {name}: {exc}", file=sys.stderr)
                    return 1
                what = (
                    "created" if result.created else f"updated ({len(result.operations)} changes)"
                )
                print(f"{name}: {result.persona_id} {what}")
        return 0

    return asyncio.run(push())
