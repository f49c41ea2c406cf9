"""`cvi-agent bot` and `cvi-agent room serve`: the room bot and the local room server as commands.

Failures a user can cause (a room that cannot be joined, an unknown persona, a database that
cannot be opened) end the command with one readable line on stderr and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from cvi_agent.config import Settings
from cvi_agent.rooms.policy import RoomPolicy, RoomRefused
from cvi_agent.web.logs import configured_secrets, install_log_filters, redaction_filter

log = logging.getLogger("cvi_agent.bot")

EXIT_JOIN_FAILED = 1
EXIT_USAGE = 2


class _Lines(logging.Formatter):
    """`12:00:01 ← replica: "…"` for the bot's own lines; level and logger name for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            # exc_text: the traceback as the redaction filter left it (web/logs.py)
            message += "\n" + (record.exc_text or self.formatException(record.exc_info))
        if record.name == "cvi_agent.bot" and record.levelno < logging.WARNING:
            return f"{stamp} {message}"
        return f"{stamp} {record.levelname.lower()} {record.name}: {message}"


def _setup_logging(level: str, verbose: bool, *secrets: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("daily").setLevel(logging.WARNING)
    install_log_filters(*secrets)  # no key, token or meeting token in a line


def _fail(message: str, code: int) -> int:
    # The room URL in a join error carries the meeting token (`?t=`): masked like a log line.
    print(f"cvi-agent bot: {redaction_filter().redact(message)}", file=sys.stderr, flush=True)
    return code


def add_parsers(sub: Any) -> None:
    bot = sub.add_parser(
        "bot",
        help="join a conversation's room: record every event, answer client tools",
        description="Join a conversation's room as a bot: log and record every event, send "
        "interactions, answer the persona's client tools, and leave when the conversation ends "
        "or the last human has left.",
    )
    bot.add_argument(
        "--conversation-url",
        required=True,
        help="the Daily room URL (a host on CVI_ROOM_HOSTS), or ws:// for a local room on this "
        "machine (with CVI_LOCAL_ROOMS=1)",
    )
    bot.add_argument("--conversation-id", required=True, help="the Tavus conversation id")
    bot.add_argument("--persona", default=None, help="persona name (its client tools are answered)")
    bot.add_argument(
        "--room",
        choices=["daily", "local"],
        default=None,
        help="default: local for ws:// URLs, daily otherwise",
    )
    bot.add_argument("--meeting-token", default=None, help="a Daily meeting token (default: none)")
    bot.add_argument("--name", default="cvi-agent", help="the bot's user name in the room")
    bot.add_argument(
        "--join-timeout", type=float, default=30.0, help="give up joining after this many seconds"
    )
    bot.add_argument(
        "--leave-grace",
        type=float,
        default=10.0,
        help="seconds to stay after the last human left",
    )
    bot.add_argument(
        "--stdin",
        action="store_true",
        help="send interactions read from stdin, one JSON object per line, e.g. "
        '{"type": "echo", "text": "Hi"} (the body of POST /api/conversations/{id}/interactions)',
    )
    bot.add_argument("-v", "--verbose", action="store_true", help="debug logs (daily's too)")
    bot.set_defaults(func=cmd_bot)

    room = sub.add_parser("room", help="the local room server (websockets) for demos and tests")
    room_sub = room.add_subparsers(dest="room_command", required=True)
    serve = room_sub.add_parser("serve", help="run a LocalRoomServer until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--max-message-bytes", type=int, default=256 * 1024, help="largest message accepted"
    )
    serve.set_defaults(func=cmd_room_serve)


def cmd_bot(args: argparse.Namespace) -> int:
    from cvi_agent.rooms.daily import route_native_logs

    settings = Settings()
    kind = args.room or (
        "local" if args.conversation_url.startswith(("ws://", "wss://")) else "daily"
    )
    if kind == "daily":
        route_native_logs()  # daily's JSON lines become debug logs; stderr stays readable
    _setup_logging(
        settings.log_level, args.verbose, *configured_secrets(settings), args.meeting_token or ""
    )
    if args.join_timeout <= 0:
        return _fail("--join-timeout must be positive", EXIT_USAGE)
    try:  # the same allow-list as the server's bots (CVI_ROOM_HOSTS, CVI_LOCAL_ROOMS)
        RoomPolicy.from_settings(settings).check(args.conversation_url)
    except RoomRefused as exc:
        return _fail(str(exc), EXIT_USAGE)
    persona = None
    if args.persona:
        from cvi_agent.personas import PersonaError
        from cvi_agent.runtime import load_checked_personas

        try:
            personas = load_checked_personas(settings)
        except PersonaError as exc:
            return _fail(f"cannot load personas: {str(exc).splitlines()[0]}", EXIT_USAGE)
        persona = personas.get(args.persona)
        if persona is None:
            known = ", ".join(sorted(personas)) or "none"
            return _fail(f"unknown persona {args.persona!r} (known: {known})", EXIT_USAGE)
    try:
        return asyncio.run(_run_bot(args, kind, settings, persona))
    except KeyboardInterrupt:
        return 130


async def _run_bot(args: argparse.Namespace, kind: str, settings: Settings, persona: Any) -> int:
    from cvi_agent.bot.session import ConversationBot
    from cvi_agent.rooms.base import BaseRoom, RoomJoinError
    from cvi_agent.rooms.daily import DailyRoom
    from cvi_agent.rooms.local import LocalRoom
    from cvi_agent.store import open_store

    try:
        store = await open_store(settings.database_url)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(f"cannot open the database {settings.database_url}: {first}", EXIT_USAGE)
    room: BaseRoom
    if kind == "daily":
        room = DailyRoom(join_timeout=args.join_timeout)
    else:
        room = LocalRoom(join_timeout=args.join_timeout)
    bot = ConversationBot(
        room,
        conversation_id=args.conversation_id,
        store=store,
        persona=persona,
        bot_name=args.name,
        leave_grace=args.leave_grace,
        log_prefix="",
    )
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    joined = False

    def interrupted(name: str) -> None:
        if joined:
            bot.request_stop(f"interrupted ({name})")
        elif main is not None:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted, sig.name)
    try:
        try:
            await store.upsert_conversation(
                args.conversation_id,
                conversation_url=args.conversation_url,
                persona=persona.name if persona is not None else None,
            )
        except Exception as exc:  # the record is a convenience; the bot still runs without it
            log.warning("could not record the conversation: %s", str(exc).splitlines()[0])
        log.info("joining %s (%s room) as %s", args.conversation_url, kind, args.name)
        try:
            await bot.start(args.conversation_url, args.meeting_token)
        except RoomJoinError as exc:
            return _fail(str(exc), EXIT_JOIN_FAILED)
        except asyncio.CancelledError:
            return _fail("interrupted while joining", 130)
        joined = True
        feeder = loop.create_task(_feed_stdin(bot)) if args.stdin else None
        reason = await bot.run()
        if feeder is not None:
            feeder.cancel()
        print(f"cvi-agent bot: left the room: {reason}", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await store.aclose()


async def _feed_stdin(bot: Any) -> None:
    """Interactions typed (or piped) into the bot, one JSON object per line."""
    import json

    from pydantic import ValidationError

    from cvi_agent.protocol.interactions import InteractionRequest
    from cvi_agent.rooms.base import RoomError

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError) as exc:
        log.warning("cannot read interactions from stdin: %s", exc)
        return
    while line := await reader.readline():
        text = line.decode("utf-8", "replace").strip()
        if not text:
            continue
        try:
            interaction = InteractionRequest.parse(json.loads(text))
        except (ValueError, ValidationError) as exc:
            log.warning("stdin: not an interaction (%s): %s", str(exc).splitlines()[0], text[:200])
            continue
        try:
            await bot.send(interaction)
        except RoomError as exc:
            log.warning("stdin: not sent: %s", exc)


def cmd_room_serve(args: argparse.Namespace) -> int:
    _setup_logging(Settings().log_level, False)
    try:
        return asyncio.run(_serve_room(args))
    except KeyboardInterrupt:
        return 0


async def _serve_room(args: argparse.Namespace) -> int:
    from cvi_agent.rooms.local_server import LocalRoomServer

    server = LocalRoomServer(args.host, args.port, max_message_bytes=args.max_message_bytes)
    try:
        await server.start()
    except OSError as exc:
        print(
            f"cvi-agent room: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    print(
        f"cvi-agent room: serving local rooms on {server.url} (one room per path, e.g. "
        f"{server.room_url('demo')}); Ctrl-C stops",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0
