"""The bench's table: every figure beside its direct-to-upstream twin, medians and tails."""

from __future__ import annotations

from typing import Any

from cvi_agent.devtools.bench.stats import ratio


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        if value > 0 and unit == "+":
            return "+" + text
        return text
    return f"{value:,}" if isinstance(value, int) else str(value)


def _rss(report: dict[str, Any]) -> str:
    procs = report["processes"]

    def one(values: list[float]) -> str:
        return " + ".join(f"{v:.0f}" for v in values) or "-"

    return "peak RSS MB: " + ", ".join(
        f"{name.replace('_', ' ')} {one(procs[name]['peak_rss_mb'])}"
        for name in ("server", "server_redis", "relay", "upstream", "load_generator")
        if name in procs
    )


def _hop_rows(o: dict[str, Any], sides: list[str]) -> list[str]:
    """CPU of the hop each side went through (relay process, server), per chunk and per
    request, and its ratio to the null relay's."""
    hop = o.get("hop_cpu")
    if not hop or "relay" not in sides:
        return []
    rows = []
    for label, key in (("chunk", "chunk"), ("request", "request")):
        values = hop[f"us_per_{key}"]
        ratios = hop[f"per_{key}_ratio_to_relay"]
        rows.append(
            f"{'hop CPU per ' + label + ' (µs)':28}"
            + "".join(f"{_fmt(values.get(x)):>11}" for x in sides)
            + f"{'':>10}{_fmt(ratios.get('through')):>8}"
            + "   (ratio: through / relay)"
        )
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The report as the text table `cvi-agent bench` prints."""
    p = report["params"]
    m = report["machine"]
    lines = [
        f"cvi-agent bench: {m['cpus']} CPUs, Python {m['python']}, {m['loop']}, "
        f"server workers {p['workers']}"
        + (f" from {p['server_src']}" if p.get("server_src") else "")
        + f"; fake upstream: TTFT {p['upstream_ttft'] * 1000:.0f} ms, "
        f"{p['tokens_per_second']:g} tokens/s, {p['reply_words']} tokens/reply, "
        f"tool-call share {p['tool_call_share']:g}",
    ]
    rss = _rss(report)
    o = report.get("overhead")
    if o:
        sides: list[str] = o.get("sides") or ["direct", "through"]
        relay = "relay" in sides
        w = max(11, *(len(side) + 2 for side in sides))
        head = "".join(f"{side:>{w}}" for side in sides)
        lines += [
            "",
            f"Overhead: {o['concurrency']} concurrent streams, {p['rounds']} rounds of "
            f"{p['phase_seconds']:g} s per side, alternating"
            + (" (relay: a null TCP relay, the cost of any extra hop here)" if relay else ""),
            f"{'':28}{head}{'added':>10}{'ratio':>8}" + (f"{'over relay':>12}" if relay else ""),
        ]

        def row(label: str, values: dict[str, Any], extra: str = "") -> str:
            return f"{label:28}" + "".join(f"{_fmt(values.get(x)):>{w}}" for x in sides) + extra

        for label, key in (("time to first token", "ttft"), ("inter-chunk gap", "inter_chunk")):
            table = o[f"{key}_ms"]
            for q in ("p50", "p95", "p99"):
                added = _fmt(o[f"added_{key}_ms"].get(q), "+")
                times = _fmt(ratio(table["through"][q], table["direct"][q]))
                over = _fmt(o.get(f"added_{key}_over_relay_ms", {}).get(q), "+")
                lines.append(
                    row(
                        f"{label} {q} (ms)",
                        {x: table[x][q] for x in sides},
                        f"{added:>10}{times:>8}" + (f"{over:>12}" if relay else ""),
                    )
                )
            with_redis = o.get("added_ttft_with_redis_ms")
            if key == "ttft" and with_redis:
                lines.append(
                    "  added by CVI_REDIS_URL (through_redis minus through, ms): "
                    + "  ".join(f"{q} {_fmt(with_redis[q], '+')}" for q in ("p50", "p95", "p99"))
                )
            server_view = o.get("server_measured_overhead_ms")
            if key == "ttft" and server_view:
                lines.append(
                    "  added, as the server itself measures it (bucket bounds, ms): "
                    + "  ".join(f"{q} ≤ {_fmt(server_view[q])}" for q in ("p50", "p95", "p99"))
                )
        cps = o["chunks_per_second"]
        lines += [
            row(
                "chunks per second",
                cps,
                f"{'':>10}{_fmt(ratio(cps.get('through'), cps.get('direct'))):>8}",
            ),
            row("streams", o["streams"]),
            row("errors", o["errors"]),
            *(
                row(
                    "CPU share: " + proc.replace("_", " "),
                    {x: o["cpu_share"].get(x, {}).get(proc) for x in sides},
                )
                for proc in ("server", "server_redis", "relay", "upstream", "load_generator")
                if any(proc in o["cpu_share"].get(x, {}) for x in sides)
            ),
            f"{'server CPU per chunk (µs)':28}{_fmt(o['server_cpu_us_per_chunk']):>11}"
            f"   (through; one idle wake-up on this machine costs "
            f"{_fmt(m.get('idle_wakeup_cpu_us'))} µs)",
            *_hop_rows(o, sides),
            rss,
        ]
        if o["error_samples"]:
            lines.append(f"error samples: {'; '.join(o['error_samples'])}")
    s = report.get("speculative")
    if s:
        lines += [
            "",
            f"Speculative: {s['conversations']} conversations, {p['partials']} progressive "
            f"partials {p['partial_gap'] * 1000:.0f} ms apart, final after "
            f"{p['end_of_turn'] * 1000:.0f} ms, {p['abandon_share']:.0%} abandoned",
            f"{'':36}{'direct':>12}{'through':>12}{'ratio':>9}",
        ]
        d, t = s["direct"], s["through"]
        for q in ("p50", "p99"):
            dv, tv = d["final_ttft_ms"][q], t["final_ttft_ms"][q]
            lines.append(
                f"{'final time to first token ' + q + ' (ms)':36}{_fmt(dv):>12}{_fmt(tv):>12}"
                f"{_fmt(ratio(tv, dv)):>9}"
            )
        lines += [
            f"{'upstream tokens generated':36}{_fmt(d['upstream_tokens_generated']):>12}"
            f"{_fmt(t['upstream_tokens_generated']):>12}"
            f"{_fmt(ratio(t['upstream_tokens_generated'], d['upstream_tokens_generated'])):>9}",
            f"{'tokens spoken (finals)':36}{_fmt(d['tokens_spoken']):>12}"
            f"{_fmt(t['tokens_spoken']):>12}",
            f"{'generated per spoken':36}{_fmt(d['generated_per_spoken']):>12}"
            f"{_fmt(t['generated_per_spoken']):>12}",
        ]
        for label, key in (
            ("disconnect→upstream closed", "cancel_delay_abandoned_ms"),
            ("superseded: close→upstream closed", "cancel_delay_superseded_ms"),
        ):
            for q in ("p50", "p99"):
                lines.append(
                    f"{label + ' ' + q:36}{_fmt(d[key][q]):>12}{_fmt(t[key][q]):>12}"
                    + ("   ms" if q == "p50" else "")
                )
        lines += [
            f"{'replay hits (server metric)':36}{'':>12}{_fmt(s['replay_hits']):>12}",
            f"{'errors':36}{_fmt(d['errors']):>12}{_fmt(t['errors']):>12}",
            rss,
            "(negative close→closed: the upstream was closed by the superseding request before "
            "the client let go)",
        ]
    if report.get("scaleout"):
        lines += ["", *_scaleout_lines(report["scaleout"], p)]
    lines += ["", f"errors: {report['errors']}   took {report['seconds']} s"]
    if report.get("server_log_tail"):
        lines += ["server log:", report["server_log_tail"]]
    return "\n".join(lines)


def _scaleout_lines(so: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """The scale-out table: one column per setup."""
    setups: dict[str, dict[str, Any]] = so["setups"]
    names = list(setups)
    lines = [
        f"Scale-out: {so['conversations']} conversations through a round-robin relay (one "
        f"connection per request), {p['partials']} partials {p['partial_gap'] * 1000:.0f} ms "
        f"apart, final after {p['end_of_turn'] * 1000:.0f} ms",
        f"{'':40}" + "".join(f"{n:>16}" for n in names),
    ]

    def row(label: str, get: Any) -> str:
        return f"{label:40}" + "".join(f"{_fmt(get(setups[n])):>16}" for n in names)

    for q in ("p50", "p99"):
        lines.append(
            row(f"final time to first token {q} (ms)", lambda s, q=q: s["final_ttft_ms"][q])
        )
    lines += [
        row("upstream completions per spoken turn", lambda s: s["completions_per_turn"]),
        row("upstream tokens generated per spoken", lambda s: s["generated_per_spoken"]),
        row(
            "  same, spoken conversations only",
            lambda s: s["generated_per_spoken_turns_only"],
        ),
        row("replay hits", lambda s: s["replay_hits"]),
        row("superseded (cancelled)", lambda s: s["superseded"]),
        row("turns forwarded to their owner", lambda s: s["forwarded"]),
        row(
            "owners taken over / Redis fallbacks",
            lambda s: f"{s['taken_over']}/{s['local_fallback']}",
        ),
    ]
    for q in ("p50", "p99"):
        lines.append(
            row(
                f"supersede→upstream closed {q} (ms)",
                lambda s, q=q: s["supersede_to_upstream_closed_ms"][q],
            )
        )
    lines += [
        row("spoken turns", lambda s: s["turns"]),
        row("errors", lambda s: s["errors"]),
        row(
            "peak RSS MB: web processes",
            lambda s: " ".join(f"{v:.0f}" for v in s["peak_rss_mb"]["servers"]),
        ),
        row(
            "peak RSS MB: relay", lambda s: " ".join(f"{v:.0f}" for v in s["peak_rss_mb"]["relay"])
        ),
        "upstream peak RSS MB: " + " ".join(f"{v:.0f}" for v in so.get("upstream_peak_rss_mb", [])),
        "targets (300 ms upstream): final TTFT p50 ≤ 10 ms, p99 ≤ 30 ms; ≤ 1.05 completions per "
        "turn; ≤ 1.1 tokens generated per spoken",
    ]
    return lines
