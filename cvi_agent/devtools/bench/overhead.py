"""The overhead scenario: what cvi-agent adds to each streamed reply, against the upstream
directly and a null TCP relay, measured in the same run (phases alternate between them)."""

from __future__ import annotations

from typing import Any

from cvi_agent.devtools.bench.load import (
    PhaseStats,
    Progress,
    Target,
    merge_phases,
    run_phase,
    settle,
)
from cvi_agent.devtools.bench.metrics import histogram_quantiles, server_histogram
from cvi_agent.devtools.bench.params import BenchParams
from cvi_agent.devtools.bench.processes import Child
from cvi_agent.devtools.bench.stats import delta, ratio, summarize_ms

#: The process that carries each side's streams: its CPU is what the side's hop costs.
HOP_PROCESS = {"relay": "relay", "through": "server"}


def hop_cpu(sides: dict[str, PhaseStats]) -> dict[str, dict[str, float | None]]:
    """CPU of the process each stream went through (the null relay, the server), per relayed
    chunk and per request (µs), and as a ratio to the null relay's of the same run: the floor
    any extra process hop costs on this machine, so a ratio reads the same on a busy machine.
    With `--words 1`, the per-request figure is what a request costs apart from its chunks."""
    per_chunk: dict[str, float | None] = {}
    per_request: dict[str, float | None] = {}
    for name, proc in HOP_PROCESS.items():
        side = sides.get(name)
        if side is None:
            continue
        cpu = side.cpu.get(proc)
        per_chunk[name] = round(cpu / side.chunks * 1e6, 2) if cpu and side.chunks else None
        per_request[name] = round(cpu / side.streams * 1e6, 1) if cpu and side.streams else None
    return {
        "us_per_chunk": per_chunk,
        "us_per_request": per_request,
        "per_chunk_ratio_to_relay": {
            name: ratio(per_chunk.get(name), per_chunk.get("relay")) for name in per_chunk
        },
        "per_request_ratio_to_relay": {
            name: ratio(per_request.get(name), per_request.get("relay")) for name in per_request
        },
    }


async def overhead_scenario(
    params: BenchParams,
    targets: list[Target],
    children: dict[str, Child],
    progress: Progress,
) -> dict[str, Any]:
    """Phases alternate between the targets (direct, null relay, through cvi-agent)."""
    if params.warmup_seconds > 0:
        for target in targets:
            if target.name.startswith("through"):  # each cvi-agent server
                label = f"warm-up: {target.name}"
                await run_phase(target, params, params.warmup_seconds, progress, label, None)
        await settle(children)
    phases: dict[str, list[PhaseStats]] = {t.name: [] for t in targets}
    overhead0 = server_histogram(children["server"], "cvi_added_overhead_seconds")
    for round_no in range(1, params.rounds + 1):
        for target in targets:
            label = f"overhead round {round_no}/{params.rounds}: {target.name}"
            stats = await run_phase(target, params, params.phase_seconds, progress, label, children)
            phases[target.name].append(stats)
    overhead1 = server_histogram(children["server"], "cvi_added_overhead_seconds")
    sides = {name: merge_phases(stats) for name, stats in phases.items()}
    ttft = {name: summarize_ms(side.ttfts) for name, side in sides.items()}
    gaps = {name: summarize_ms(side.gaps) for name, side in sides.items()}
    t = sides["through"]
    server_cpu_per_chunk = t.server_cpu / t.chunks * 1e6 if t.chunks else None

    def added(table: dict[str, dict[str, float | None]], base: str) -> dict[str, float | None]:
        if base not in table:
            return {}
        return {q: delta(table["through"][q], table[base][q]) for q in table["through"]}

    redis = (
        {q: delta(ttft["through_redis"][q], ttft["through"][q]) for q in ttft["through"]}
        if "through_redis" in ttft
        else None
    )
    return {
        "concurrency": params.concurrency,
        # the same server with CVI_REDIS_URL set, minus without (None: not measured)
        "added_ttft_with_redis_ms": redis,
        "sides": list(sides),
        "streams": {name: side.streams for name, side in sides.items()},
        "ttft_ms": ttft,
        "added_ttft_ms": added(ttft, "direct"),
        "added_ttft_over_relay_ms": added(ttft, "relay"),
        "server_measured_overhead_ms": histogram_quantiles(overhead0, overhead1),
        "inter_chunk_ms": gaps,
        "added_inter_chunk_ms": added(gaps, "direct"),
        "added_inter_chunk_over_relay_ms": added(gaps, "relay"),
        "chunks_per_second": {
            name: round(side.chunks / side.seconds, 1) if side.seconds else None
            for name, side in sides.items()
        },
        "chunks": {name: side.chunks for name, side in sides.items()},
        "server_cpu_us_per_chunk": round(server_cpu_per_chunk, 2)
        if server_cpu_per_chunk is not None
        else None,
        "hop_cpu": hop_cpu(sides),
        "server_cpu_share": round(t.server_cpu / t.seconds, 3) if t.seconds else None,
        "cpu_share": {
            name: {proc: round(sec / side.seconds, 3) for proc, sec in side.cpu.items()}
            for name, side in sides.items()
            if side.seconds
        },
        "errors": {name: side.errors for name, side in sides.items()},
        "error_samples": [e for side in sides.values() for e in side.error_samples][:10],
    }
