"""CLI commands for the conversation record: `worker`, `conversations …`.

`conversations …` talks to our own API
(`--url`, default CVI_PUBLIC_URL), because creating a conversation also starts its bot and
records it, which only a running server can do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from cvi_agent.config import Settings
from cvi_agent.personas import PersonaError
from cvi_agent.web.logs import configure_logging, configured_secrets, install_log_filters


def add_record_commands(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="run conversation bots (claims conversations through leases)"
    )
    worker.add_argument("--id", default=None, help="worker id (default: host:pid:random)")
    worker.set_defaults(func=cmd_worker)

    conv = sub.add_parser("conversations", help="create, list, show, end conversations (our API)")
    conv.add_argument("--url", default=None, help="our server (default: $CVI_PUBLIC_URL)")
    conv.add_argument("--key", default=None, help="API key (default: first of $CVI_API_KEYS)")
    actions = conv.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create on Tavus and start a bot")
    create.add_argument("persona", help="one of our personas (its name)")
    create.add_argument(
        "--replica-id", default=None, help="the replica (default: the persona's on Tavus)"
    )
    create.add_argument("--name", default=None, help="conversation_name")
    create.add_argument("--context", default=None, help="conversational_context")
    create.add_argument("--greeting", default=None, help="custom_greeting")
    create.add_argument(
        "--test-mode", action="store_true", help="Tavus test mode: no replica joins, no charge"
    )
    create.add_argument("--no-bot", action="store_true", help="do not start a bot")
    listing = actions.add_parser("list", help="newest first")
    listing.add_argument("--limit", type=int, default=20, help="conversations per page")
    listing.add_argument(
        "--cursor", default=None, help="the next page (what the previous page printed)"
    )
    get = actions.add_parser("get", help="the whole record, as JSON")
    get.add_argument("id", help="the conversation id")
    end = actions.add_parser("end", help="end on Tavus and stop the bot")
    end.add_argument("id", help="the conversation id")
    interact = actions.add_parser("interact", help="send an interaction (JSON body)")
    interact.add_argument("id", help="the conversation id")
    interact.add_argument("body", help='e.g. \'{"type": "echo", "text": "Hello"}\'')
    interact.add_argument(
        "--via",
        choices=("auto", "rest", "bot"),
        default=None,
        help="Tavus's API (rest) or the bot (default: the server's CVI_INTERACTIONS_VIA)",
    )
    interact.add_argument(
        "--idempotency-key", default=None, help="makes a retry safe: sent at most once"
    )
    conv.set_defaults(func=cmd_conversations)


# -- worker ------------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from cvi_agent.runtime import load_checked_personas

    settings = Settings()
    configure_logging(settings.log_level, *configured_secrets(settings), fmt=settings.log_format)
    try:
        personas = load_checked_personas(settings)
    except PersonaError as exc:
        print(f"cvi-agent: cannot load personas:\n{exc}", file=sys.stderr)
        return 2
    install_log_filters(*configured_secrets(settings, personas))  # their upstream keys too
    print(
        f"cvi-agent worker: database {_safe_url(settings.database_url)}, "
        f"bus {'redis' if settings.redis_url else 'in-process (single process only)'}, "
        f"capacity {settings.worker_capacity}, lease {settings.lease_seconds}s",
        flush=True,
    )
    return asyncio.run(_run_worker(settings, personas, args.id))


async def _run_worker(settings: Settings, personas: dict[str, Any], worker_id: str | None) -> int:
    from cvi_agent.bot.worker import Worker
    from cvi_agent.conversations.service import ConversationService
    from cvi_agent.store import SqlStore

    store = SqlStore(settings.database_url)
    await store.init()
    record = await ConversationService.start(settings, store, personas, run_worker=False)
    worker = Worker.from_settings(
        settings, store=store, bus=record.bus, personas=personas, publish=record.publish
    )
    if worker_id:
        worker.worker_id = worker_id
    record.worker = worker
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
        print(f"cvi-agent worker {worker.worker_id}: ready", flush=True)
        await stop.wait()
    finally:
        await record.aclose()  # stops bots and gives their leases back at once
        await store.aclose()
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- conversations -----------------------------------------------------------------------------


def _api_key(settings: Settings, given: str | None) -> str:
    if given:
        return given
    if settings.api_keys:
        return settings.api_keys[0]
    path = Path(settings.var_dir) / "dev-api-key"
    return path.read_text().strip() if path.exists() else ""


def cmd_conversations(args: argparse.Namespace) -> int:
    settings = Settings()
    base = (args.url or settings.public_url).rstrip("/")
    headers = {"Authorization": f"Bearer {_api_key(settings, args.key)}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            if args.action == "create":
                body: dict[str, Any] = {"persona": args.persona, "bot": not args.no_bot}
                for field, value in (
                    ("replica_id", args.replica_id),
                    ("conversation_name", args.name),
                    ("conversational_context", args.context),
                    ("custom_greeting", args.greeting),
                ):
                    if value is not None:
                        body[field] = value
                if args.test_mode:
                    body["test_mode"] = True
                resp = http.post("/api/conversations", json=body)
            elif args.action == "list":
                params: dict[str, Any] = {"limit": args.limit}
                if args.cursor:
                    params["cursor"] = args.cursor
                resp = http.get("/api/conversations", params=params)
                if resp.status_code == 200:
                    return _print_list(resp.json())
            elif args.action == "get":
                resp = http.get(f"/api/conversations/{args.id}")
            elif args.action == "end":
                resp = http.post(f"/api/conversations/{args.id}/end")
            else:
                try:
                    interaction = json.loads(args.body)
                except ValueError as exc:
                    print(f"cvi-agent: the body is not JSON: {exc}", file=sys.stderr)
                    return 2
                resp = http.post(
                    f"/api/conversations/{args.id}/interactions",
                    json=interaction,
                    params={"via": args.via} if args.via else None,
                    headers={"Idempotency-Key": args.idempotency_key}
                    if args.idempotency_key
                    else None,
                )
    except httpx.HTTPError as exc:
        print(f"cvi-agent: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:500]
        print(f"cvi-agent: HTTP {resp.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(resp.json(), indent=2))
    return 0


def _print_list(page: dict[str, Any]) -> int:
    for c in page.get("data", []):
        print(
            f"{c['id']:<24} {c['status']:<8} {c.get('persona') or '-':<14} {c.get('conversation_url') or ''}"
        )
    if page.get("next_cursor"):
        print(f"(more: --cursor {page['next_cursor']})")
    return 0
