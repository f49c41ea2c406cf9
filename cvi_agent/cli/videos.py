"""`cvi-agent videos …`: create, get, list, avatars, voices, webhooks register, fake-server.

Commands talk to the providers configured in the environment and record what they learn in
the same store as the server (`CVI_DATABASE_URL`). Offline, `cvi-agent videos fake-server`
serves fake Tavus/Argil/JoggAI APIs on loopback and prints the variables that point the
clients at it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cvi_agent.config import Settings, mask_key
from cvi_agent.store import SqlStore, VideoRecord, open_store
from cvi_agent.videos.base import PENDING, PROVIDERS, ProviderError
from cvi_agent.videos.service import (
    VideoService,
    jogg_secret_path,
    jogg_secrets,
    write_secret,
)

Command = Callable[[argparse.Namespace], int]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _run(args: argparse.Namespace, body: Callable[[VideoService], Awaitable[int]]) -> int:
    """Open the store and a service, run `body`, close everything; errors → exit codes."""

    async def main() -> int:
        settings = Settings()
        store: SqlStore = await open_store(settings.database_url)
        service = VideoService(settings, store)
        try:
            return await body(service)
        finally:
            await service.aclose()
            await store.aclose()

    try:
        return asyncio.run(main())
    except ProviderError as exc:
        print(f"cvi-agent: {exc}", file=sys.stderr)
        return 1


def _row(video: VideoRecord) -> dict[str, Any]:
    return video.as_dict()


async def _pick(
    service: VideoService, provider: str, args: argparse.Namespace
) -> tuple[str, str | None]:
    """The avatar and voice to use: as given, else the provider's first ones (said on stderr)."""
    avatar, voice = args.avatar, args.voice
    client = service.provider(provider)
    if not avatar:
        avatars = await client.list_avatars()
        if not avatars:
            raise ProviderError(provider, "no avatars available: pass --avatar")
        avatar = avatars[0].id
        print(f"cvi-agent: using avatar {avatar} ({avatars[0].name})", file=sys.stderr)
    if not voice and provider != "tavus" and not args.audio_url:
        voices = await client.list_voices()
        if voices:
            voice = voices[0].id
            print(f"cvi-agent: using voice {voice} ({voices[0].name})", file=sys.stderr)
    return str(avatar), voice


async def _wait(service: VideoService, video: VideoRecord, seconds: float) -> VideoRecord:
    deadline = time.monotonic() + seconds
    delay = 0.5
    while video.status in PENDING and time.monotonic() < deadline:
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        video = await service.refresh(video.provider, video.video_id)
        print(f"cvi-agent: {video.provider}/{video.video_id}: {video.status}", file=sys.stderr)
        delay = min(delay * 1.5, 5.0)
    return video


def _outcome(video: VideoRecord, waited: float) -> int:
    """The exit status of `create --wait`: 0 only when the video is ready; otherwise one
    line on stderr says what it is (failed, with the provider's reason, or still pending)."""
    name = f"{video.provider}/{video.video_id}"
    if video.status == "ready":
        return 0
    if video.status in PENDING:
        print(f"cvi-agent: {name}: still {video.status} after {waited:g} s", file=sys.stderr)
    else:
        reason = f": {video.error}" if video.error else ""
        print(f"cvi-agent: {name}: {video.status}{reason}", file=sys.stderr)
    return 1


def cmd_create(args: argparse.Namespace) -> int:
    if (args.script is None) == (args.audio_url is None):
        print("cvi-agent: give exactly one of --script and --audio-url", file=sys.stderr)
        return 2

    async def body(service: VideoService) -> int:
        avatar, voice = await _pick(service, args.provider, args)
        video = await service.create(
            args.provider,
            avatar=avatar,
            voice=voice,
            script=args.script,
            audio_url=args.audio_url,
            title=args.title,
            conversation_id=args.conversation_id,
            meta={"created_by": "cli"},
        )
        if args.wait:
            video = await _wait(service, video, args.wait)
        _print_json(_row(video))
        return _outcome(video, args.wait) if args.wait else 0

    return _run(args, body)


def cmd_get(args: argparse.Namespace) -> int:
    async def body(service: VideoService) -> int:
        _print_json(_row(await service.refresh(args.provider, args.video_id)))
        return 0

    return _run(args, body)


def cmd_list(args: argparse.Namespace) -> int:
    async def body(service: VideoService) -> int:
        videos = await service.store.list_videos(
            args.conversation_id,
            args.limit,
            provider=args.provider,
            statuses=[args.status] if args.status else None,
        )
        if args.json:
            _print_json([_row(v) for v in videos])
            return 0
        if not videos:
            print("no videos")
            return 0
        print(f"{'provider':<8} {'video_id':<38} {'status':<9} {'conversation':<14} url")
        for v in videos:
            print(
                f"{v.provider:<8} {v.video_id:<38} {v.status:<9} "
                f"{(v.conversation_id or '-'):<14} {v.url or v.error or '-'}"
            )
        return 0

    return _run(args, body)


def cmd_avatars(args: argparse.Namespace) -> int:
    async def body(service: VideoService) -> int:
        client = service.provider(args.provider)
        items = (
            await client.list_avatars()
            if args.videos_command == "avatars"
            else await client.list_voices()
        )
        for item in items:
            print(f"{item.id}\t{item.name}")
        if not items:
            print(f"({args.provider} has none to list)", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_webhooks(args: argparse.Namespace) -> int:
    async def body(service: VideoService) -> int:
        from cvi_agent.videos.argil import ArgilVideos
        from cvi_agent.videos.jogg import JoggVideos

        client = service.provider(args.provider)
        if args.action == "list":
            if isinstance(client, ArgilVideos):
                _print_json(await client.list_webhooks())
            elif isinstance(client, JoggVideos):
                hooks = await client.list_endpoints()
                _print_json([{k: v for k, v in h.items() if k != "secret"} for h in hooks])
            return 0
        url = args.url or service.account_webhook_url(args.provider)
        shown = url.split("?", 1)[0] + ("?token=…" if "?" in url else "")
        if isinstance(client, ArgilVideos):
            hook, created = await client.register_webhook(url)
            print(f"argil webhook {hook.get('id')} {'created' if created else 'updated'}: {shown}")
            return 0
        assert isinstance(client, JoggVideos)
        settings = service.settings
        path = jogg_secret_path(settings)
        endpoint, created = await client.register_webhook(
            url, have_secret=bool(jogg_secrets(settings))
        )
        secret = endpoint.get("secret")
        if secret:
            write_secret(path, str(secret))
            print(f"jogg webhook secret {mask_key(str(secret))} stored in {path} (mode 0600)")
        endpoint_id = endpoint.get("endpoint_id") or endpoint.get("id")
        print(f"jogg webhook endpoint {endpoint_id} {'created' if created else 'updated'}: {shown}")
        return 0

    return _run(args, body)


def cmd_fake_server(args: argparse.Namespace) -> int:
    import uvicorn

    from cvi_agent.devtools.fakes.videos import FakeVideoProviders, env

    # Bind first: a taken port is one line and exit 1, before anything is promised on stdout.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)  # clients that connect before uvicorn serves wait in the backlog
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        hint = " (another server is there; pick another with --port)"
        print(
            f"cvi-agent videos fake-server: cannot listen on {args.host}:{args.port}: {reason}"
            + (hint if exc.errno == errno.EADDRINUSE else ""),
            file=sys.stderr,
        )
        return 1
    fake = FakeVideoProviders(args.key, stage_seconds=args.stage_seconds)
    url = f"http://{args.host}:{args.port}"
    # Every line is shell: `> fake.env &` then `. fake.env` points the clients at the fakes.
    print("# cvi-agent: fake Tavus/Argil/JoggAI video APIs; point the clients at them with:")
    for name, value in env(url, args.key).items():
        print(f"export {name}={value}")
    sys.stdout.flush()
    config = uvicorn.Config(fake.app, log_level="warning", access_log=False)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def add_videos_parser(sub: Any) -> None:
    """Add `videos …` to the `cvi-agent` parser (called from cli.build_parser)."""
    videos = sub.add_parser("videos", help="avatar videos (Tavus, Argil, JoggAI)")
    vsub = videos.add_subparsers(dest="videos_command", required=True)

    create = vsub.add_parser("create", help="create a video from a script or an audio URL")
    create.add_argument("--provider", choices=PROVIDERS, required=True, help="who renders it")
    create.add_argument("--script", default=None, help="what the avatar says")
    create.add_argument("--audio-url", default=None, help="instead of --script (.wav/.mp3)")
    create.add_argument("--avatar", default=None, help="default: the provider's first avatar")
    create.add_argument("--voice", default=None, help="default: the provider's first voice")
    create.add_argument("--title", default=None, help="a title (default: none)")
    create.add_argument(
        "--conversation-id", default=None, help="the conversation it belongs to (default: none)"
    )
    create.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="poll until done (bounded)"
    )
    create.set_defaults(func=cmd_create)

    get = vsub.add_parser("get", help="ask the provider for a video's status, and record it")
    get.add_argument("video_id", help="the provider's video id")
    get.add_argument("--provider", choices=PROVIDERS, required=True, help="who rendered it")
    get.set_defaults(func=cmd_get)

    listing = vsub.add_parser("list", help="videos in our store")
    listing.add_argument(
        "--provider", choices=PROVIDERS, default=None, help="only this provider's (default: all)"
    )
    listing.add_argument(
        "--conversation-id", default=None, help="only this conversation's (default: all)"
    )
    listing.add_argument(
        "--status",
        choices=["queued", "rendering", "ready", "failed"],
        help="only videos in this state (default: all)",
    )
    listing.add_argument("--limit", type=int, default=50, help="videos to list")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(func=cmd_list)

    for name in ("avatars", "voices"):
        p = vsub.add_parser(name, help=f"list the provider's {name}")
        p.add_argument("--provider", choices=PROVIDERS, required=True, help="whose to list")
        p.set_defaults(func=cmd_avatars)

    hooks = vsub.add_parser("webhooks", help="account-level webhooks (Argil, JoggAI)")
    hooks.add_argument(
        "action", choices=["register", "list"], help="register ours, or list the registered"
    )
    hooks.add_argument(
        "--provider", choices=["argil", "jogg"], required=True, help="whose webhooks"
    )
    hooks.add_argument(
        "--url", default=None, help="default: $CVI_PUBLIC_URL/callbacks/<provider>[?token=…]"
    )
    hooks.set_defaults(func=cmd_webhooks)

    fake = vsub.add_parser("fake-server", help="serve fake provider APIs on loopback")
    fake.add_argument("--host", default="127.0.0.1", help="address to bind")
    fake.add_argument(
        "--port",
        type=int,
        default=8766,
        help="port to listen on (the local room server, `room serve`, uses 8765)",
    )
    fake.add_argument("--stage-seconds", type=float, default=2.0, help="time per status")
    fake.add_argument("--key", default="fake-video-key", help="the API key the fakes accept")
    fake.set_defaults(func=cmd_fake_server)
