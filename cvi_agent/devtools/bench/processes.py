"""The bench's child processes (fake upstream, null relay, server) and what they cost: CPU
time and memory of each process tree, read with psutil."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

MB = 2**20


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a server with `--workers N` is a tree)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return [pid]
    return [pid, *(child.pid for child in children)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads); 0 once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def rss_mb(pids: list[int]) -> float:
    """The resident memory of these processes now, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return round(total / MB, 1)


def peak_rss_mb(pid: int) -> float | None:
    """The highest resident memory a process has had (the kernel's high-water mark).

    The one figure still read from /proc: psutil (7.2) has no high-water mark, and sampling
    the RSS instead would miss the peaks between samples.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def self_peak_rss_mb() -> float:
    """This process's peak RSS (the load generator's)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def idle_wakeup_cpu_us(samples: int = 200) -> float:
    """CPU a process burns per wake-up from a 1 ms sleep on this machine (virtualization tax).

    A streaming relay wakes up for every chunk when tokens come slowly, so this sets the floor
    of its CPU per chunk; on bare metal it is a few µs, on a busy VM tens.
    """
    start = time.process_time()
    for _ in range(samples):
        time.sleep(0.001)
    return round((time.process_time() - start) / samples * 1e6, 1)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    loop_name = "asyncio"
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401  # optional: only to say which loop the bench runs on

        loop_name = "uvloop"
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "loop": loop_name,
        "idle_wakeup_cpu_us": idle_wakeup_cpu_us(),
    }


class Child:
    """A subprocess (fake upstream, relay or server) on a loopback port.

    Args:
        name: how errors name it.
        argv: the command line.
        port: the loopback port it listens on.
        env: its environment.
        log: where its stderr goes (its tail is shown when it fails).
        cwd: its working directory (None: ours).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self.port = port
        self.env = env
        self.log_path = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str, headers: dict[str, str] | None = None) -> Child:
        """Start it and wait (30 s at most) until `ready_path` answers 200."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(self.url + ready_path, headers=headers or {})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within 30 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its stderr."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Its process tree."""
        return process_tree(self.proc.pid) if self.proc else []

    def cpu(self) -> float:
        """CPU seconds its whole tree has used."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> list[float]:
        """Peak RSS of each process of its tree, MB."""
        return [r for r in (peak_rss_mb(pid) for pid in self.pids()) if r is not None]

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        """GET `path` as JSON (raises on failure)."""
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def get_text(self, path: str, headers: dict[str, str] | None = None) -> str | None:
        """GET `path` as text; None when it fails."""
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return str(resp.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    def stop(self) -> None:
        """Terminate it (kill after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
