"""`cvi-agent` / `python -m cvi_agent`: serve, personas, and (as they land) bot, conversations,
simulate, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cvi_agent.cli.conversations import add_push_arguments, add_record_commands, cmd_personas_push
from cvi_agent.config import Settings, ensure_dev_callback_token, ensure_dev_key, mask_key
from cvi_agent.personas import PersonaError
from cvi_agent.web.request_id import RequestIdFormatter

Command = Callable[[argparse.Namespace], int]


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    # A line written while a request is handled ends with its x-request-id.
    handler.setFormatter(RequestIdFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cvi_agent.app import create_app
    from cvi_agent.runtime import load_checked_personas

    settings = Settings()
    host = args.host or settings.host
    port = args.port or settings.port
    _setup_logging(settings.log_level)
    try:
        personas = load_checked_personas(settings)
    except PersonaError as exc:
        print(f"cvi-agent: cannot load personas:\n{exc}", file=sys.stderr)
        return 2
    generated = ensure_dev_key(settings)
    base = f"http://{host}:{port}"
    if generated:
        print(f"cvi-agent: no CVI_API_KEYS set; development API key: {generated}", flush=True)
        print(f"cvi-agent: (stored in {settings.var_dir / 'dev-api-key'})", flush=True)
        if ensure_dev_callback_token(settings):
            print(f"cvi-agent: development callback token in {settings.var_dir}", flush=True)
    if not settings.callback_tokens:
        print("cvi-agent: CVI_CALLBACK_TOKEN is not set: /callbacks/tavus answers 503", flush=True)
    else:
        print(
            f"cvi-agent: {len(settings.api_keys)} API key(s) configured "
            f"({', '.join(mask_key(k) for k in settings.api_keys)})",
            flush=True,
        )
    print(f"cvi-agent: personas: {', '.join(sorted(personas))}", flush=True)
    print(
        f"cvi-agent: serving on {base}  (chat: {base}/v1/chat/completions, docs: {base}/docs)",
        flush=True,
    )
    if args.workers and args.workers > 1:
        import os

        if not settings.redis_url:
            print(
                "cvi-agent: warning: several processes without CVI_REDIS_URL: live feeds and "
                "interactions only reach bots in the same process",
                flush=True,
            )

        # Workers import the app factory themselves; pass the generated key through the env.
        os.environ["CVI_API_KEYS"] = settings.api_keys_raw
        os.environ["CVI_CALLBACK_TOKEN"] = settings.callback_token
        uvicorn.run(
            "cvi_agent.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            log_level=settings.log_level,
            access_log=False,
        )
        return 0
    uvicorn.run(
        create_app(settings, personas),
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


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


def cmd_bench(args: argparse.Namespace) -> int:
    from cvi_agent.devtools.bench import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvi-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(func=cmd_serve)

    personas = sub.add_parser("personas", help="list, validate, or push personas to Tavus")
    personas.add_argument("action", choices=["list", "validate", "push"])
    personas.add_argument("--dir", default=None, help="default: $CVI_PERSONAS_DIR or ./personas")
    add_push_arguments(personas)
    personas.set_defaults(func=cmd_personas)
    add_record_commands(sub)

    from cvi_agent.cli.videos import add_videos_parser

    add_videos_parser(sub)

    from cvi_agent.cli.simulate import add_simulate_parser

    add_simulate_parser(sub)

    from cvi_agent.devtools.soak import add_soak_parser

    add_soak_parser(sub)

    from cvi_agent.devtools.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="measure added latency and CPU against a fake upstream (see the README's Benchmark section)",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from cvi_agent.cli.bot import add_parsers as add_bot_parsers

    add_bot_parsers(sub)  # bot, room serve
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
