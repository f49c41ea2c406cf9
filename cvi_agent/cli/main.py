"""`cvi-agent` / `python -m cvi_agent`: the top-level parser and `serve`.

Each command group lives in its own module (personas, conversations and worker, bot and room,
simulate, videos, bench, soak) and registers its parser here. Commands import what they run
(the app, uvicorn, the runtime) inside themselves, so `cvi-agent --help` stays fast; the CLI
is the top layer, so these lazy imports dodge no cycle."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from cvi_agent import __version__
from cvi_agent.cli.conversations import add_record_commands
from cvi_agent.cli.personas import add_personas_parser
from cvi_agent.config import Settings, ensure_dev_callback_token, ensure_dev_key, mask_key
from cvi_agent.personas import PersonaError

Command = Callable[[argparse.Namespace], int]


def cmd_serve(args: argparse.Namespace) -> int:
    """Load and check everything, bind the port, then print the banner and serve.

    What would stop the server (invalid personas, a busy port, an unreachable database or
    Redis) is one line on stderr and exit status 2, before anything says "serving"; what only
    degrades it (an upstream without a key, a local public URL with Tavus) is a warning."""
    import asyncio

    from cvi_agent.app import create_app
    from cvi_agent.doctor import startup_checks
    from cvi_agent.runtime import load_checked_personas
    from cvi_agent.web.logs import configure_logging, configured_secrets, install_log_filters
    from cvi_agent.web.server import listen, serve

    settings = Settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    configure_logging(settings.log_level, *configured_secrets(settings), fmt=settings.log_format)
    try:
        personas = load_checked_personas(settings)
    except PersonaError as exc:
        print(f"cvi-agent: cannot load personas:\n{exc}", file=sys.stderr)
        return 2
    if args.workers and args.workers > 1 and settings.redis_url and settings.turns_port:
        print(
            "cvi-agent: --workers needs CVI_TURNS_PORT unset (0): each worker listens for "
            "forwarded turns on a port of its own",
            file=sys.stderr,
        )
        return 2
    try:
        sock = listen(host, port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        print(
            f"cvi-agent: cannot listen on {host}:{port}: {why} (another server is using it? "
            "stop it, or choose another port with --port or PORT)",
            file=sys.stderr,
        )
        return 2
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    generated = ensure_dev_key(settings)
    generated_token = ensure_dev_callback_token(settings) if generated else None
    checks = asyncio.run(startup_checks(settings, personas))
    fatal = [c for c in checks if c.status == "FAIL" and c.name in ("database", "redis")]
    if fatal:
        sock.close()
        for check in fatal:
            print(f"cvi-agent: cannot start: {check.line(status=False)}", file=sys.stderr)
        return 2
    base = f"http://{host}:{port}"
    if generated:
        where = settings.var_dir / "dev-api-key"
        print(
            f"cvi-agent: no CVI_API_KEYS set, so development mode; the API key is kept in "
            f"{where}; development API key: {generated}",
            flush=True,
        )
        if generated_token:
            print(
                "cvi-agent: no CVI_CALLBACK_TOKEN set; Tavus callbacks authenticate with the "
                f"generated token kept in {settings.var_dir / 'callback-token'}",
                flush=True,
            )
        if settings.local_rooms is None:  # the console's simulations meet in a local room
            settings.local_rooms = True
            print("cvi-agent: development mode: local rooms allowed (CVI_LOCAL_ROOMS)", flush=True)
    install_log_filters(*configured_secrets(settings, personas))  # the generated ones too
    if settings.api_keys and not generated:
        print(
            f"cvi-agent: {len(settings.api_keys)} API key(s) configured "
            f"({', '.join(mask_key(k) for k in settings.api_keys)})",
            flush=True,
        )
    print(f"cvi-agent: personas: {', '.join(sorted(personas))}", flush=True)
    for check in checks:
        if check.status != "OK":
            print(f"cvi-agent: warning: {check.line(status=False)}", flush=True)
    print(
        f"cvi-agent: serving on {base}  (console: {base}/  chat: {base}/v1/chat/completions  "
        f"docs: {base}/docs  readiness: {base}/readyz)",
        flush=True,
    )
    if args.workers and args.workers > 1:
        import shutil

        from cvi_agent.metrics import MULTIPROC_ENV

        if not settings.redis_url:
            print(
                "cvi-agent: warning: several processes without CVI_REDIS_URL: live feeds and "
                "interactions only reach bots in the same process, and a conversation's "
                "speculative turns are only replayed or cancelled within one worker",
                flush=True,
            )
        # /metrics adds up every worker's numbers (prometheus_client's multiprocess mode) in a
        # directory of this server's own (another `serve --workers` may share the var dir);
        # those of servers no longer running are removed, so no earlier run is counted.
        metrics_root = (settings.var_dir / "prometheus").resolve()
        if metrics_root.is_dir():
            for old in metrics_root.iterdir():
                if not (old.name.isdigit() and _running(int(old.name))):
                    shutil.rmtree(old, ignore_errors=True)
        metrics_dir = metrics_root / str(os.getpid())
        metrics_dir.mkdir(parents=True)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)

        # Workers import the app factory themselves; pass the generated key through the env.
        os.environ["CVI_API_KEYS"] = settings.api_keys_raw
        os.environ["CVI_CALLBACK_TOKEN"] = settings.callback_token
        if settings.local_rooms is not None:
            os.environ["CVI_LOCAL_ROOMS"] = "1" if settings.local_rooms else "0"
        serve(None, settings, workers=args.workers, sock=sock, host=host, port=port)
        return 0
    app = create_app(settings, personas)
    return 0 if serve(app, settings, sock=sock, host=host, port=port) else 3


def _running(pid: int) -> bool:
    """Whether a process with this id exists (another server's metrics are still its own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_bench(args: argparse.Namespace) -> int:
    from cvi_agent.devtools.bench.cli import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvi-agent",
        description="Custom LLM backend, live room orchestration and callback ingestion for "
        "Tavus CVI personas.",
        epilog="Start with `cvi-agent serve`; `cvi-agent doctor` checks the configuration. "
        "Every setting comes from the environment (README.md, Configuration); logs go to "
        "stderr (CVI_LOG_LEVEL, CVI_LOG_FORMAT=json). `cvi-agent COMMAND --help` for a "
        "command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"cvi-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the HTTP server (LLM endpoint, conversations API, callbacks, console)",
    )
    serve.add_argument("--host", default=None, help="address to bind (default: $HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: $PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default: 1; several need CVI_REDIS_URL)",
    )
    serve.set_defaults(func=cmd_serve)

    from cvi_agent.cli.doctor import add_doctor_parser

    add_doctor_parser(sub)

    add_personas_parser(sub)
    add_record_commands(sub)

    from cvi_agent.cli.videos import add_videos_parser

    add_videos_parser(sub)

    from cvi_agent.cli.simulate import add_simulate_parser

    add_simulate_parser(sub)

    from cvi_agent.devtools.soak import add_soak_parser

    add_soak_parser(sub)

    from cvi_agent.devtools.bench.options import add_arguments as add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="measure added latency and CPU against a fake upstream (see the README's Benchmark section)",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from cvi_agent.cli.bot import add_parsers as add_bot_parsers

    add_bot_parsers(sub)  # bot, room serve
    document_defaults(parser)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from _parsers(sub)


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Make every option's help say its default (`(default: …)` unless it already does), so
    `--help` never hides what a command does when an option is left out."""
    for each in _parsers(parser):
        for action in each._actions:
            default, text = action.default, action.help
            if text == argparse.SUPPRESS or default is None or default is False:
                continue
            if default == [] or default == argparse.SUPPRESS:
                continue
            if not text:
                action.help = "default: %(default)s"
            elif "default" not in text.lower():
                action.help = f"{text} (default: %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cvi-agent … | head`: the reader left, no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
