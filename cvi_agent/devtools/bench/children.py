"""The bench's processes, started the same way by every scenario: the fake upstream, the
cvi-agent server (one or several, with or without Redis) and the null relay (round robin over
several targets)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cvi_agent.devtools.bench.params import (
    BENCH_KEY,
    PERSONA,
    SPEECH_PERSONA,
    WEATHER_TOOL,
    BenchParams,
)
from cvi_agent.devtools.bench.processes import Child
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


def write_personas(workdir: Path) -> Path:
    """The bench's two personas in `workdir/personas`."""
    personas = workdir / "personas"
    personas.mkdir(exist_ok=True)
    (personas / f"{PERSONA}.yaml").write_text(_persona_yaml(PERSONA, tools=True))
    (personas / f"{SPEECH_PERSONA}.yaml").write_text(_persona_yaml(SPEECH_PERSONA, False))
    return personas


def start_upstream(params: BenchParams, workdir: Path) -> Child:
    """The fake upstream (TTFT, tokens per second, reply length from `params`)."""
    port = free_port()
    return Child(
        "fake upstream",
        [
            sys.executable,
            "-m",
            "cvi_agent.devtools.fakes.upstream",
            "--port",
            str(port),
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
        port,
        dict(os.environ),
        workdir / "upstream.log",
    ).start("/_fake/records?since=999999999")


def start_server(
    params: BenchParams,
    workdir: Path,
    upstream: Child,
    name: str = "server",
    redis_url: str | None = None,
    workers: int | None = None,
) -> Child:
    """`cvi-agent serve` answering the bench personas from `upstream`, its own database and
    var directory; with `redis_url`, its turns are shared over Redis (never otherwise: a
    `CVI_REDIS_URL` of the caller's environment is not passed on)."""
    personas = write_personas(workdir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CVI_REDIS_URL"}
    env.update(
        {
            "CVI_API_KEYS": BENCH_KEY,
            "CVI_PERSONAS_DIR": str(personas),
            "CVI_UPSTREAM_BASE_URL": upstream.url + "/v1",
            "CVI_UPSTREAM_API_KEY": "sk-bench",
            "CVI_VAR_DIR": str(workdir / f"var-{name}"),
            "CVI_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / f'{name}.db'}",
            "CVI_LOG_LEVEL": "warning",
            # One key drives the whole load: the per-key limits would measure themselves.
            "CVI_RATE_LIMIT_RPS": "0",
            "CVI_RATE_LIMIT_CONCURRENT": "0",
            "CVI_RATE_LIMIT_BYTES": "0",
        }
    )
    if redis_url:
        env["CVI_REDIS_URL"] = redis_url
    if params.server_src:
        env["PYTHONPATH"] = str(Path(params.server_src).resolve())
    return Child(
        f"cvi-agent ({name})",
        [
            sys.executable,
            "-m",
            "cvi_agent",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(params.workers if workers is None else workers),
        ],
        port,
        env,
        workdir / f"{name}.log",
        cwd=workdir,  # not the current directory: `-m` puts it first on sys.path
    ).start("/healthz")


def start_relay(workdir: Path, targets: list[Child], ready: str, name: str = "relay") -> Child:
    """The null relay in front of `targets` (round robin per connection when several), once
    `ready` (a path) answers through it."""
    port = free_port()
    argv = [sys.executable, "-m", "cvi_agent.devtools.fakes.relay", "--port", str(port)]
    for target in targets:
        argv += ["--to", f"127.0.0.1:{target.port}"]
    return Child(name, argv, port, dict(os.environ), workdir / f"{name}.log").start(ready)
