"""One bench run: start the processes on loopback, run the scenarios, put the report together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cvi_agent.devtools.bench.children import start_relay, start_server, start_upstream
from cvi_agent.devtools.bench.load import Progress, Target
from cvi_agent.devtools.bench.overhead import overhead_scenario
from cvi_agent.devtools.bench.params import BENCH_KEY, PERSONA, SPEECH_PERSONA, BenchParams
from cvi_agent.devtools.bench.processes import Child, machine_info, self_peak_rss_mb
from cvi_agent.devtools.bench.scaleout import scaleout_scenario
from cvi_agent.devtools.bench.speculative import speculative_scenario


async def _run_async(
    params: BenchParams,
    upstream: Child,
    server: Child,
    relay: Child,
    redis_server: Child | None,
    progress: Progress,
) -> dict[str, Any]:
    direct = Target("direct", upstream.port, "/v1/chat/completions", "fake", {}, tools=True)
    relayed = dataclasses.replace(direct, name="relay", port=relay.port)
    through = Target(
        "through",
        server.port,
        "/v1/chat/completions",
        PERSONA,
        {"Authorization": f"Bearer {BENCH_KEY}"},
        tools=True,
    )
    progress.start()
    report: dict[str, Any] = {}
    try:
        if "overhead" in params.scenarios:
            children = {"server": server, "upstream": upstream, "relay": relay}
            targets = [direct, relayed, through]
            if redis_server is not None:  # the same server with its turns shared over Redis
                children["server_redis"] = redis_server
                targets.append(
                    dataclasses.replace(through, name="through_redis", port=redis_server.port)
                )
            report["overhead"] = await overhead_scenario(params, targets, children, progress)
        if "speculative" in params.scenarios:
            run_id = f"{os.getpid()}-{int(time.time())}"
            report["speculative"] = await speculative_scenario(
                params,
                dataclasses.replace(direct, tools=False),
                dataclasses.replace(through, model=SPEECH_PERSONA),
                upstream,
                server,
                progress,
                run_id,
            )
    finally:
        await progress.stop()
    return report


@contextlib.contextmanager
def _processes(params: BenchParams) -> Iterator[tuple[Child, Child, Child, Child | None]]:
    """Fake upstream, server, null relay (and, with `overhead_redis`, a second server with its
    turns shared over Redis), started in a scratch directory and stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix="cvi-bench-"))
    children: list[Child] = []
    try:
        upstream = start_upstream(params, workdir)
        children.append(upstream)
        server = start_server(params, workdir, upstream)
        children.append(server)
        redis_server = None
        if params.overhead_redis and "overhead" in params.scenarios:
            redis_server = start_server(
                params, workdir, upstream, name="server-redis", redis_url=params.redis_url
            )
            children.append(redis_server)
        relay = start_relay(workdir, [upstream], "/_fake/records?since=999999999")
        children.append(relay)
        yield upstream, server, relay, redis_server
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run_loop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop  # optional: the stdlib loop does when it is missing
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_bench(params: BenchParams, progress: bool = False) -> dict[str, Any]:
    """Run the scenarios and return the report (what `--json` prints)."""
    started = time.monotonic()
    report: dict[str, Any] = {}
    processes: dict[str, Any] = {}
    server_log = ""
    if any(s != "scaleout" for s in params.scenarios):
        with _processes(params) as (upstream, server, relay, redis_server):
            report = _run_loop(
                _run_async(params, upstream, server, relay, redis_server, Progress(progress))
            )
            processes = {
                "server": {"pids": len(server.pids()), "peak_rss_mb": server.rss()},
                "upstream": {"peak_rss_mb": upstream.rss()},
                "relay": {"peak_rss_mb": relay.rss()},
            }
            if redis_server is not None:
                processes["server_redis"] = {"peak_rss_mb": redis_server.rss()}
            server_log = server.log_tail(10)
    if "scaleout" in params.scenarios:
        report["scaleout"] = _run_loop(scaleout_scenario(params, Progress(progress)))
    processes["load_generator"] = {"peak_rss_mb": [self_peak_rss_mb()]}
    errors = sum(
        int(section.get("errors", 0))
        if not isinstance(section.get("errors"), dict)
        else sum(section["errors"].values())
        for section in report.values()
    )
    return {
        "params": {**asdict(params), "scenarios": list(params.scenarios)},
        "machine": machine_info(),
        **report,
        "processes": processes,
        "errors": errors,
        "seconds": round(time.monotonic() - started, 1),
        "server_log_tail": server_log if errors else "",
    }
