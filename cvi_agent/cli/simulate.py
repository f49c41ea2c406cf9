"""`cvi-agent simulate`: play a script against a server (one started here, or `--server`).

The quickest way to see the whole product work offline: a table of per-turn latency in a
terminal, or the report as JSON for a machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

from cvi_agent.config import Settings, ensure_dev_callback_token, ensure_dev_key
from cvi_agent.conversations.delivery import check_standin_url
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.simulate.engine import Printer, Simulation
from cvi_agent.devtools.simulate.report import SimulationReport, render_table
from cvi_agent.devtools.simulate.script import DEFAULT_SCRIPT, load_script
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.web.logs import configured_secrets, install_log_filters


def add_simulate_parser(sub: Any) -> None:
    """Register `simulate` with the CLI's subcommands."""
    parser = sub.add_parser(
        "simulate",
        help="an offline stand-in for Tavus: a simulated user and replica talk to the server",
        description="Plays a script (YAML) as Tavus would: progressive (speculative) requests, "
        "a replica speaking in a local room, tool calls answered by the bot, callbacks at the end.",
    )
    parser.add_argument(
        "--server", default=None, help="a running server's URL (default: start one here)"
    )
    parser.add_argument(
        "--key", default=None, help="API key (default: CVI_API_KEYS or var/dev-api-key)"
    )
    parser.add_argument(
        "--callback-token", default=None, help="default: CVI_CALLBACK_TOKEN or var/callback-token"
    )
    parser.add_argument(
        "--script", type=Path, default=None, help=f"default: {DEFAULT_SCRIPT.name} (shipped)"
    )
    parser.add_argument("--persona", default=None, help="override the script's persona")
    parser.add_argument("--words-per-second", type=float, default=None, help="speaking speed")
    parser.add_argument(
        "--linger", type=float, default=0.0, help="seconds to stay for interactions"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_simulate)


def cmd_simulate(args: Any) -> int:
    """Run one simulation and print its report; exit 1 if it met errors, 2 if it could not start.

    Without `--server` it starts the app here, on the same settings and database as
    `cvi-agent serve` would use, with the development key and callback token it generates.
    """
    # The app (every router) is imported when the command runs, not when `cvi-agent --help`
    # builds the parser: as `serve` does, to keep the CLI's start quick.
    from cvi_agent.app import create_app
    from cvi_agent.runtime import load_checked_personas

    try:
        script = load_script(args.script)
    except ValueError as exc:
        print(f"cvi-agent simulate: {exc}", file=sys.stderr)
        return 2
    updates: dict[str, Any] = {}
    if args.persona:
        updates["persona"] = args.persona
    if args.words_per_second:
        updates["words_per_second"] = args.words_per_second
    script = script.model_copy(update=updates)
    settings = Settings()
    if args.server is None:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if ensure_dev_key(settings):
            ensure_dev_callback_token(settings)
        if settings.local_rooms is None:  # the server started here is for this local room
            settings.local_rooms = True
    key = args.key or (
        settings.api_keys[0] if settings.api_keys else _read(settings.var_dir / "dev-api-key")
    )
    token = args.callback_token or (
        settings.callback_tokens[0]
        if settings.callback_tokens
        else _read(settings.var_dir / "callback-token")
    )
    if not key:
        print("cvi-agent simulate: no API key: pass --key or set CVI_API_KEYS", file=sys.stderr)
        return 2
    try:
        personas = load_checked_personas(settings)
    except Exception as exc:
        print(f"cvi-agent simulate: cannot load personas: {exc}", file=sys.stderr)
        return 2
    persona = personas.get(script.persona)
    if persona is None:
        print(
            f"cvi-agent simulate: no persona {script.persona!r} in {settings.personas_dir}",
            file=sys.stderr,
        )
        return 2

    printer: Printer = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    server = None
    server_url = args.server
    if server_url is None:
        # Served as `cvi-agent serve` serves (our HTTP protocol, its deadlines and cap).
        server = LoopbackServer(create_app(settings, personas), settings=settings).start()
        server_url = server.url
        printer(f"started a server on {server_url} (database {settings.database_url})")
    # After uvicorn set up its loggers: no key or token in whatever they, or httpx, print.
    install_log_filters(*configured_secrets(settings, personas), key, token)

    async def main() -> SimulationReport:
        async with LocalRoomServer("127.0.0.1", 0) as rooms:
            conversation_id = "sim-" + secrets.token_hex(5)
            simulation = Simulation(
                server_url=server_url,
                api_key=key,
                callback_token=token or None,
                room_url=rooms.room_url(conversation_id),
                script=script,
                persona_name=persona.persona_name,
                system_prompt=" ".join(p for p in (persona.system_prompt, persona.context) if p),
                tools=[t.openai_tool() for t in persona.client_tools()],
                conversation_id=conversation_id,
                printer=printer,
                linger=args.linger,
                # The stand-in for Tavus's API listens on loopback: only a server on this
                # machine can deliver to it.
                rest=check_standin_url(server_url) is None,
            )
            return await simulation.run()

    try:
        report = asyncio.run(main())
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print()
        print(render_table(report))
    return 1 if report.errors else 0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
