"""`cvi-agent bench` end to end on a tiny configuration: three real processes on loopback.

Not a timed test: only generous sanity bounds; the numbers themselves are for people to read.
"""

from __future__ import annotations

import json

import pytest

from cvi_agent.cli.main import main
from tests.support import REDIS_TEST_URL

pytestmark = [pytest.mark.slow, pytest.mark.process]


def test_bench_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--json",
            "-c",
            "4",
            "--rounds",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0.3",
            "--ttft",
            "0.05",
            "--tps",
            "200",
            "--words",
            "8",
            "--conversations",
            "4",
        ]
    )
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, report
    assert report["errors"] == 0

    overhead = report["overhead"]
    assert overhead["sides"] == ["direct", "relay", "through"]
    assert overhead["errors"] == {"direct": 0, "relay": 0, "through": 0}
    for side in ("direct", "relay", "through"):
        assert overhead["streams"][side] > 0
        assert overhead["chunks"][side] > 0
        for q in ("p50", "p95", "p99"):
            assert overhead["ttft_ms"][side][q] is not None
            assert overhead["inter_chunk_ms"][side][q] is not None
    for key in ("ttft", "inter_chunk"):
        assert set(overhead[f"added_{key}_ms"]) == {"p50", "p95", "p99"}
        assert set(overhead[f"added_{key}_over_relay_ms"]) == {"p50", "p95", "p99"}
    assert set(overhead["server_measured_overhead_ms"]) == {"p50", "p95", "p99"}
    assert set(overhead["cpu_share"]["through"]) == {
        "server",
        "upstream",
        "relay",
        "load_generator",
    }
    assert overhead["chunks_per_second"]["through"] > 0
    assert 0 < overhead["server_cpu_us_per_chunk"] < 100_000
    # Upstream TTFT is 50 ms: anything near it or above is a real answer, not a sanity failure.
    assert 40 < overhead["ttft_ms"]["through"]["p50"] < 5_000

    spec = report["speculative"]
    assert spec["errors"] == 0
    assert spec["conversations"] == 4
    for side in ("direct", "through"):
        for key in (
            "final_ttft_ms",
            "upstream_tokens_generated",
            "tokens_spoken",
            "cancel_delay_superseded_ms",
            "cancel_delay_abandoned_ms",
        ):
            assert key in spec[side]
    assert spec["through"]["upstream_tokens_generated"] > 0
    assert spec["replay_hits"] is not None

    for name in ("server", "relay", "upstream", "load_generator"):
        rss = report["processes"][name]["peak_rss_mb"]
        assert rss and all(0 < r < 4096 for r in rss)
    assert report["machine"]["cpus"] >= 1


@pytest.mark.redis
def test_bench_scaleout_report(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--json",
            "--scenario",
            "scaleout",
            "--web-processes",
            "2",
            "--redis-url",
            REDIS_TEST_URL,
            "--ttft",
            "0.05",
            "--tps",
            "200",
            "--words",
            "8",
            "--conversations",
            "4",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    scaleout = report["scaleout"]
    assert list(scaleout["setups"]) == ["single", "2_redis", "2_no_redis"]
    for name, setup in scaleout["setups"].items():
        assert setup["errors"] == 0, name
        assert setup["turns"] > 0
        for key in ("final_ttft_ms", "supersede_to_upstream_closed_ms"):
            assert set(setup[key]) == {"p50", "p95", "p99"}
        assert setup["completions_per_turn"] >= 1
        assert setup["generated_per_spoken"] >= 1
        rss = setup["peak_rss_mb"]["servers"]
        assert len(rss) == setup["web_processes"] and all(0 < r < 4096 for r in rss)
    shared = scaleout["setups"]["2_redis"]
    assert shared["replay_hits"] == shared["turns"], "every final replays, whichever process"
    assert scaleout["upstream_peak_rss_mb"]


def test_bench_hop_cpu_ratios_to_the_relay(capsys: pytest.CaptureFixture[str]) -> None:
    """The overhead scenario reports, per side, the CPU of the process each stream went
    through per chunk and per request, and both as ratios to the null relay of the same run
    (`--words 1`: the per-request figure is a request's own cost)."""
    # Enough requests that the relay's CPU is well above the clock tick (10 ms) it is read in.
    args = ["bench", "--scenario", "overhead", "-c", "30", "--rounds", "1", "--seconds", "1"]
    args += ["--warmup", "0", "--ttft", "0.002", "--tps", "1000", "--words", "1"]
    assert main([*args, "--json"]) == 0
    hop = json.loads(capsys.readouterr().out)["overhead"]["hop_cpu"]
    for key in ("us_per_chunk", "us_per_request"):
        assert set(hop[key]) == {"relay", "through"}
        assert all(0 < v < 1_000_000 for v in hop[key].values())
    for key in ("per_chunk_ratio_to_relay", "per_request_ratio_to_relay"):
        assert hop[key]["relay"] == 1.0
        assert hop[key]["through"] > 0
    # A request relays at least one chunk: it costs at least what one chunk costs.
    assert hop["us_per_request"]["through"] >= hop["us_per_chunk"]["through"] * 0.9

    assert main(args) == 0
    table = capsys.readouterr().out
    for label in ("hop CPU per chunk (µs)", "hop CPU per request (µs)"):
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert "(ratio: through / relay)" in row
        assert row.split()[-5] not in ("-", "")  # the ratio column is filled
