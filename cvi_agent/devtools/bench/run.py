"""One bench run: start the processes on loopback, run the scenarios, put the report together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cvi_agent.devtools.bench.load import Progress, Target
from cvi_agent.devtools.bench.overhead import overhead_scenario
from cvi_agent.devtools.bench.params import (
    BENCH_KEY,
    PERSONA,
    SPEECH_PERSONA,
    WEATHER_TOOL,
    BenchParams,
)
from cvi_agent.devtools.bench.processes import Child, machine_info, self_peak_rss_mb
from cvi_agent.devtools.bench.speculative import speculative_scenario
from cvi_agent.devtools.fakes.server import free_port


def _persona_yaml(name: str, tools: bool) -> str:
    """A persona answered by the fake upstream (JSON is YAML)."""
    return json.dumps(
        {
            "name": name,
            "persona_name": "Bench",
            "system_prompt": "A benchmark persona answered by the fake upstream.",
            "brain": {"kind": "upstream", "model": "fake", "max_tokens": 300},
            "tools": [{**WEATHER_TOOL, "execution": "client"}] if tools else [],
        }
    )


async def _run_async(
    params: BenchParams, upstream: Child, server: Child, relay: Child, progress: Progress
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
            report["overhead"] = await overhead_scenario(
                params, [direct, relayed, through], children, progress
            )
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
def _processes(params: BenchParams) -> Iterator[tuple[Child, Child, Child]]:
    """Fake upstream, server and null relay, started in a scratch directory and stopped after."""
    workdir = Path(tempfile.mkdtemp(prefix="cvi-bench-"))
    upstream = server = relay = None
    try:
        personas = workdir / "personas"
        personas.mkdir()
        (personas / f"{PERSONA}.yaml").write_text(_persona_yaml(PERSONA, tools=True))
        (personas / f"{SPEECH_PERSONA}.yaml").write_text(_persona_yaml(SPEECH_PERSONA, False))
        env = dict(os.environ)
        upstream_port = free_port()
        upstream = Child(
            "fake upstream",
            [
                sys.executable,
                "-m",
                "cvi_agent.devtools.fakes.upstream",
                "--port",
                str(upstream_port),
                "--ttft",
                str(params.upstream_ttft),
                "--tps",
                str(params.tokens_per_second),
                "--words",
                str(params.reply_words),
                "--tool-call-share",
                str(params.tool_call_share),
                "--seed",
                str(params.seed),
            ],
            upstream_port,
            env,
            workdir / "upstream.log",
        ).start("/_fake/records?since=999999999")
        server_port = free_port()
        server_env = {
            **env,
            "CVI_API_KEYS": BENCH_KEY,
            "CVI_PERSONAS_DIR": str(personas),
            "CVI_UPSTREAM_BASE_URL": upstream.url + "/v1",
            "CVI_UPSTREAM_API_KEY": "sk-bench",
            "CVI_VAR_DIR": str(workdir / "var"),
            "CVI_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'cvi.db'}",
            "CVI_LOG_LEVEL": "warning",
            # One key drives the whole load: the per-key limits would measure themselves.
            "CVI_RATE_LIMIT_RPS": "0",
            "CVI_RATE_LIMIT_CONCURRENT": "0",
            "CVI_RATE_LIMIT_BYTES": "0",
        }
        if params.server_src:
            server_env["PYTHONPATH"] = str(Path(params.server_src).resolve())
        server = Child(
            "cvi-agent",
            [
                sys.executable,
                "-m",
                "cvi_agent",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
                "--workers",
                str(params.workers),
            ],
            server_port,
            server_env,
            workdir / "server.log",
            cwd=workdir,  # not the current directory: `-m` puts it first on sys.path
        ).start("/healthz")
        relay_port = free_port()
        relay = Child(
            "null relay",
            [
                sys.executable,
                "-m",
                "cvi_agent.devtools.fakes.relay",
                "--port",
                str(relay_port),
                "--to",
                f"127.0.0.1:{upstream.port}",
            ],
            relay_port,
            env,
            workdir / "relay.log",
        ).start("/_fake/records?since=999999999")
        yield upstream, server, relay
    finally:
        for child in (relay, server, upstream):
            if child is not None:
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
    with _processes(params) as (upstream, server, relay):
        report = _run_loop(_run_async(params, upstream, server, relay, Progress(progress)))
        processes = {
            "server": {"pids": len(server.pids()), "peak_rss_mb": server.rss()},
            "upstream": {"peak_rss_mb": upstream.rss()},
            "relay": {"peak_rss_mb": relay.rss()},
            "load_generator": {"peak_rss_mb": [self_peak_rss_mb()]},
        }
        server_log = server.log_tail(10)
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
