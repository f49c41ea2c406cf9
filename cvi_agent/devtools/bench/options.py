"""`cvi-agent bench`'s options. Apart from the bench's machinery because every `cvi-agent`
command builds the whole parser, `serve` too: the server should not load the bench to start."""

from __future__ import annotations

import argparse
import os

from cvi_agent.devtools.bench.params import BenchParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` subcommand's options (defaults from `BenchParams`)."""
    d = BenchParams()
    parser.add_argument(
        "--scenario",
        choices=["all", "overhead", "speculative", "scaleout"],
        default="all",
        help="which scenario(s) to run (default: all = overhead and speculative)",
    )
    parser.add_argument(
        "--web-processes",
        type=int,
        default=d.web_processes,
        help="scaleout: web processes behind the round-robin relay (default 2)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("CVI_REDIS_URL") or d.redis_url,
        help="scaleout and --overhead-redis: the Redis the servers share turns over "
        "(default: $CVI_REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--overhead-redis",
        action="store_true",
        help="overhead: also measure the same server with CVI_REDIS_URL set, side by side",
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, default=d.concurrency, help="streams at once"
    )
    parser.add_argument("--rounds", type=int, default=d.rounds, help="direct/through phase pairs")
    parser.add_argument(
        "--seconds", type=float, default=d.phase_seconds, help="length of one phase"
    )
    parser.add_argument("--warmup", type=float, default=d.warmup_seconds, help="seconds")
    parser.add_argument("--workers", type=int, default=d.workers, help="server worker processes")
    parser.add_argument("--ttft", type=float, default=d.upstream_ttft, help="upstream TTFT, s")
    parser.add_argument("--tps", type=float, default=d.tokens_per_second, help="tokens/s")
    parser.add_argument("--words", type=int, default=d.reply_words, help="tokens per reply")
    parser.add_argument(
        "--tool-call-share",
        type=float,
        default=d.tool_call_share,
        help="share of replies that are tool calls",
    )
    parser.add_argument(
        "--conversations",
        type=int,
        default=d.conversations,
        help="speculative scenario: conversations",
    )
    parser.add_argument(
        "--partials", type=int, default=d.partials, help="speculative requests per turn"
    )
    parser.add_argument(
        "--server-src",
        default=None,
        metavar="DIR",
        help="run the server from another source tree (e.g. `git archive` of an older commit)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def params_from_args(args: argparse.Namespace) -> BenchParams:
    """The options as `BenchParams`, each clamped to a value that can run."""
    scenarios = ("overhead", "speculative") if args.scenario == "all" else (args.scenario,)
    return BenchParams(
        scenarios=scenarios,
        concurrency=max(1, args.concurrency),
        rounds=max(1, args.rounds),
        phase_seconds=max(0.2, args.seconds),
        warmup_seconds=max(0.0, args.warmup),
        workers=max(1, args.workers),
        upstream_ttft=max(0.0, args.ttft),
        tokens_per_second=max(0.0, args.tps),
        reply_words=max(1, args.words),
        tool_call_share=min(1.0, max(0.0, args.tool_call_share)),
        conversations=max(2, args.conversations),
        partials=max(2, args.partials),
        server_src=args.server_src,
        web_processes=max(1, args.web_processes),
        redis_url=args.redis_url,
        overhead_redis=bool(args.overhead_redis),
    )
