"""Opt-in memory diagnostics for a running server (off unless `CVI_TRACEMALLOC` is set).

`CVI_TRACEMALLOC=<file>` appends a report to <file> every `CVI_TRACEMALLOC_EVERY` seconds
(default 60) and on SIGUSR1; SIGUSR2 calls glibc's `malloc_trim` and notes how much RSS it gave
back. A report has the process's RSS, glibc's heap (in use / free inside it: free memory that
stays is fragmentation), the live objects tracked by the GC and the types whose count grew most
since the first report. Then, by `CVI_TRACEMALLOC_MODE`:

- `trace` (default): `tracemalloc` with `CVI_TRACEMALLOC_FRAMES` frames (8), and the
  allocation sites grown most since the first report (the baseline). Slows the server down.
- `garbage`: a full collection, with the types of what it found unreachable. Growth that a
  full collection gives back is reference cycles waiting for the cyclic GC, not a leak of live
  objects; the types say which cycle (`gc.DEBUG_SAVEALL`, then the garbage is freed).
- `counts`: only the counts (cheapest).

Comparing RSS growth with the traced growth tells live Python objects from allocator
fragmentation or C-level memory (SQLite's page cache, OpenSSL, …). A diagnostic, not a default.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import os
import signal
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

import psutil

FRAMES = 8
TOP = 25
MB = 2**20


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    return float(psutil.Process().memory_info().rss / MB)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def malloc_stats() -> str:
    """glibc's view of its heap (all arenas): in use, free inside it, mmapped blocks."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return "malloc: n/a"
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return (
        f"malloc: heap={info.arena / MB:.1f}MB in_use={info.uordblks / MB:.1f}MB "
        f"free={info.fordblks / MB:.1f}MB mmapped={info.hblkhd / MB:.1f}MB"
    )


def malloc_trim() -> float:
    """Give glibc's free heap memory back to the system; returns the RSS drop in MB."""
    libc = _libc()
    before = rss_mb()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return before - rss_mb()


def type_counts(objects: list[object] | None = None) -> collections.Counter[str]:
    return collections.Counter(
        type(o).__qualname__ for o in (gc.get_objects() if objects is None else objects)
    )


def _top(counts: Mapping[str, int], n: int = 15) -> str:
    items = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:n]
    return ", ".join(f"{k} {v:+d}" for k, v in items if v)


class MemoryReporter:
    def __init__(self, path: Path, every: float, mode: str = "trace", frames: int = FRAMES):
        self.path = path
        self.every = every
        self.mode = mode
        self.frames = frames
        self.started = time.monotonic()
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_types: collections.Counter[str] | None = None
        self.baseline_rss = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mode == "trace" and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR1, self.report)
            loop.add_signal_handler(signal.SIGUSR2, self.trim)
        self._task = loop.create_task(self._periodic())

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.report()

    def _write(self, lines: list[str]) -> None:
        with self.path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def trim(self) -> None:
        before = malloc_stats()
        dropped = malloc_trim()
        self._write([f"== malloc_trim: RSS -{dropped:.1f}MB ({before} → {malloc_stats()})"])

    def report(self) -> None:
        rss = rss_mb()
        live = len(gc.get_objects())
        lines = [
            f"== t={time.monotonic() - self.started:.0f}s rss={rss:.1f}MB gc-objects={live} "
            f"gc-runs={[g['collections'] for g in gc.get_stats()]} {malloc_stats()}"
        ]
        if self.mode == "garbage":
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                found = gc.collect()
            finally:
                gc.set_debug(0)
            kinds = type_counts(gc.garbage)
            gc.garbage.clear()
            gc.collect()
            lines.append(f"  a full collection found {found} unreachable objects (now freed)")
            if kinds:
                lines.append("  unreachable: " + _top(kinds, 30))
        types = type_counts()
        if self.mode == "trace":
            lines += self._traced(rss)
        if self.baseline_types is None:
            self.baseline_types, self.baseline_rss = types, rss
            lines.append("  (baseline)")
        else:
            types.subtract(self.baseline_types)
            lines.append(f"  since baseline: RSS {rss - self.baseline_rss:+.1f}MB")
            lines.append("  object types grown: " + _top(types))
        self._write(lines)

    def _traced(self, rss: float) -> list[str]:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),)
        )
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"  traced={traced / MB:.1f}MB peak={peak / MB:.1f}MB"]
        if self.baseline is None:
            self.baseline = snapshot
            return lines
        stats = snapshot.compare_to(self.baseline, "traceback")
        lines.append(f"  traced since baseline {sum(s.size_diff for s in stats) / MB:+.2f}MB")
        for stat in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:TOP]:
            if stat.size_diff <= 0:
                break
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
            lines.append(
                f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {where}"
            )
        return lines

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def start_from_env(env: Mapping[str, str] | None = None) -> MemoryReporter | None:
    """Start the reporter when `CVI_TRACEMALLOC` names a file (call on the running loop)."""
    env = os.environ if env is None else env
    target = env.get("CVI_TRACEMALLOC")
    if not target:
        return None
    reporter = MemoryReporter(
        Path(target),
        float(env.get("CVI_TRACEMALLOC_EVERY") or 60),
        env.get("CVI_TRACEMALLOC_MODE") or "trace",
        int(env.get("CVI_TRACEMALLOC_FRAMES") or FRAMES),
    )
    reporter.start()
    return reporter
