"""The soak's short variant: 200 concurrent Tavus-like conversations against a real server
process for one minute. Zero errors, the server alive, memory flat. (The latency figures are
reported, not asserted: timings on a shared machine are noisy; `make soak` runs 10 minutes.)"""

from __future__ import annotations

from cvi_agent.soak import SoakParams, render, run_soak


def test_one_minute_soak() -> None:
    summary = run_soak(SoakParams(conversations=200, duration=60.0))
    print("\n" + render(summary))
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["final_requests"] > 1000
    assert summary["conversations_ended"] >= 200
    assert summary["ttft"]["upstream"]["n"] > 100 and summary["ttft"]["direct"]["n"] > 10
    rss = summary["server_rss_mb"]
    assert rss["samples"] >= 20
    # One minute is too short for the slope verdict (`rss["leak"]`, meant for `make soak`):
    # warm-up (allocator arenas, per-connection SQLite page caches) is still going on. Only a
    # gross per-conversation leak is caught here.
    assert rss["growth"] < 40, f"server memory grew {rss['growth']} MB during the soak"
