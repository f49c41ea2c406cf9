"""Cross-process faults: the real server process killed in the middle of a webhook burst, and
the PostgreSQL server restarted under it while callbacks and LLM requests keep coming.

Both tests run `python -m cvi_agent serve` as a subprocess, as in production. The PostgreSQL
restart uses a private instance (initdb in a temporary directory, its own port), never the
machine's shared one, which other test runs use at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.protocol.callbacks import parse_tavus_callback
from cvi_agent.store.sql import RETRY_BUDGET
from tests.procs import TOKEN, ServerProcess
from tests.support import API_KEY, load_fixture

AUTH = {"Authorization": f"Bearer {API_KEY}"}


# -- the server as a process -------------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Every server a test starts is stopped at its end, whatever happened."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


# -- deliveries --------------------------------------------------------------------------------


def make_deliveries(n: int, run: str | None = None) -> list[dict[str, Any]]:
    """`n` distinct Tavus callbacks of mixed kinds (each its own dedupe key), five per
    conversation so effects on one conversation race each other."""
    run = run or uuid.uuid4().hex[:8]
    templates = [
        load_fixture("callback_replica_joined.json"),
        load_fixture("event_utterance_user.json"),
        load_fixture("callback_transcription_ready.json"),
        load_fixture("callback_recording_ready.json"),
        load_fixture("callback_shutdown.json"),
    ]
    deliveries: list[dict[str, Any]] = []
    for i in range(n):
        cid = f"pf-{run}-{i // 5:04d}"
        slot = i % 8
        if slot < len(templates):
            payload = copy.deepcopy(templates[slot])
            payload["conversation_id"] = cid
            # distinct timestamps, in both shapes Tavus uses (ISO strings, Unix seconds)
            stamp = 1739221200.0 + i / 1000.0
            payload["timestamp"] = stamp if slot == 1 else f"2025-02-10T21:00:00.{i:06d}Z"
        elif slot == 5:  # a kind nobody documented yet
            payload = {
                "event_type": f"application.future_kind_{i % 3}",
                "message_type": "application",
                "conversation_id": cid,
                "timestamp": f"2025-02-10T22:00:00.{i:06d}Z",
                "properties": {"n": i},
            }
        elif slot == 6:  # no event_type at all: kept as `unknown`
            payload = {"conversation_id": cid, "something": "new", "n": i}
        else:  # a replica-training callback: names no conversation
            payload = load_fixture("callback_replica_error.json")
            payload["replica_id"] = f"r{run}{i:05d}"
        deliveries.append(payload)
    keys = {parse_tavus_callback(d).dedupe_key for d in deliveries}
    assert len(keys) == n  # every delivery is its own row
    return deliveries


def dedupe_key(payload: dict[str, Any]) -> str:
    return parse_tavus_callback(payload).dedupe_key


async def stored_callback_keys(database_url: str) -> list[str]:
    """Every `callback` row's dedupe key, duplicates included (a list, not a set)."""
    import sqlalchemy as sa

    from cvi_agent.store import SqlStore
    from cvi_agent.store.schema import events

    store = SqlStore(database_url)
    try:
        async with store.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(events.c.dedupe_key).where(events.c.source == "callback")
            )
            return [str(r.dedupe_key) for r in rows]
    finally:
        await store.aclose()


@dataclass
class Outcome:
    status: int | None  # None: no answer (connection refused or cut)
    body: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None
    seconds: float = 0.0


async def post_callback(client: httpx.AsyncClient, base: str, payload: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    try:
        r = await client.post(f"{base}/callbacks/tavus", params={"token": TOKEN}, json=payload)
    except httpx.TransportError:
        return Outcome(None, seconds=time.monotonic() - started)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return Outcome(r.status_code, body, r.headers.get("retry-after"), time.monotonic() - started)


async def post_all(
    base: str, deliveries: list[dict[str, Any]], concurrency: int = 32
) -> list[Outcome]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=15) as client:

        async def one(payload: dict[str, Any]) -> Outcome:
            async with semaphore:
                return await post_callback(client, base, payload)

        return list(await asyncio.gather(*(one(d) for d in deliveries)))


def sqlite_integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- 1. SIGKILL in the middle of a burst -----------------------------------------------------


N_DELIVERIES = 500
KILL_AFTER = N_DELIVERIES // 2


@pytest.mark.slow
@pytest.mark.process
async def test_sigkill_mid_burst_loses_nothing_answered(
    database_url: str, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    deliveries = make_deliveries(N_DELIVERIES)
    server = ServerProcess(tmp_path, database_url)
    servers.append(server)
    await asyncio.to_thread(server.start)
    assert server.proc is not None
    pid = server.proc.pid

    outcomes: list[Outcome | None] = [None] * len(deliveries)
    answered = 0
    killed_at: float | None = None
    semaphore = asyncio.Semaphore(32)
    started = time.monotonic()

    async with httpx.AsyncClient(timeout=15) as client:

        async def one(index: int) -> None:
            nonlocal answered, killed_at
            async with semaphore:
                outcome = await post_callback(client, server.url, deliveries[index])
            outcomes[index] = outcome
            if outcome.status == 200:
                answered += 1
                if answered >= KILL_AFTER and killed_at is None:
                    os.kill(pid, signal.SIGKILL)  # the server itself, mid-burst
                    killed_at = time.monotonic() - started

        await asyncio.gather(*(one(i) for i in range(len(deliveries))))
    await asyncio.to_thread(server.proc.wait, 10)
    assert server.proc.returncode == -signal.SIGKILL
    assert killed_at is not None

    done = [o for o in outcomes if o is not None]
    assert len(done) == len(deliveries)
    statuses = {o.status for o in done}
    assert statuses <= {200, None}, statuses  # before the kill: 200; after it: no answer
    acked = [d for d, o in zip(deliveries, done, strict=True) if o.status == 200]
    assert len(acked) >= KILL_AFTER
    assert len(acked) < len(deliveries), "the kill came too late to interrupt anything"

    sqlite_file = tmp_path / "cvi.db"
    if database_url.startswith("sqlite"):
        assert sqlite_integrity(sqlite_file) == "ok"

    # Restart on the same database: everything answered 200 is there, once.
    server = ServerProcess(tmp_path, database_url, name="restarted")
    servers.append(server)
    await asyncio.to_thread(server.start)
    keys = await stored_callback_keys(database_url)
    assert len(keys) == len(set(keys)), "a delivery is stored twice"
    missing = {dedupe_key(d) for d in acked} - set(keys)
    assert not missing, f"{len(missing)} deliveries answered 200 were lost: {sorted(missing)[:5]}"
    stored_after_crash = len(keys)

    # What a user sees: each acknowledged event is in its conversation's record.
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=15) as api:
        for payload, outcome in list(zip(deliveries, done, strict=True))[:100]:
            if outcome.status != 200 or not payload.get("conversation_id"):
                continue
            r = await api.get(f"/api/conversations/{payload['conversation_id']}/events")
            assert r.status_code == 200, r.text
            ids = {e["id"] for e in r.json()["data"]}
            assert outcome.body["event_id"] in ids

    # Tavus retries everything: each delivery ends up stored exactly once.
    retried = await post_all(server.url, deliveries)
    assert {o.status for o in retried} == {200}
    before = set(keys)
    for payload, outcome in zip(deliveries, retried, strict=True):
        expected = "duplicate" if dedupe_key(payload) in before else "stored"
        assert outcome.body["status"] == expected, (payload, outcome)
    keys = await stored_callback_keys(database_url)
    assert len(keys) == len(set(keys)) == len(deliveries)
    assert set(keys) == {dedupe_key(d) for d in deliveries}
    if database_url.startswith("sqlite"):
        assert sqlite_integrity(sqlite_file) == "ok"
    assert "Traceback" not in server.log_text()
    print(
        f"\n{database_url.split(':')[0]}: {len(acked)} answered 200 before the kill "
        f"(at {killed_at:.2f} s), {stored_after_crash} rows after restart, "
        f"{sum(o.body['status'] == 'stored' for o in retried)} stored by the retries, "
        f"{len(keys)} rows in the end"
    )


# -- 2. PostgreSQL restarted under load --------------------------------------------------------


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's server binaries (`/usr/lib/postgresql/<v>/bin`)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        pytest.fail("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are required")
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster owned by the `postgres` user, on its own port."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="cvi-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 30) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / args[0]), *args[1:]]
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)

    def init(self) -> None:
        shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N")
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "20",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "20", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        message = "the PostgreSQL restart test needs root (runuser -u postgres) to run initdb"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    pg = PrivatePostgres()
    try:
        pg.init()
        yield pg
    finally:
        pg.destroy()


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.postgres
async def test_postgres_restart_is_survived(
    private_pg: PrivatePostgres, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    import asyncpg  # type: ignore[import-untyped]

    admin = await asyncpg.connect(private_pg.admin_url, timeout=5)
    try:
        await admin.execute("CREATE DATABASE cvi")
    finally:
        await admin.close()
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{private_pg.port}/cvi"
    server = ServerProcess(tmp_path, url)
    servers.append(server)
    await asyncio.to_thread(server.start)

    run = uuid.uuid4().hex[:8]
    sent: list[tuple[dict[str, Any], Outcome, float]] = []  # payload, answer, sent at
    llm: list[tuple[int, bool, float]] = []  # status, valid stream ending [DONE], seconds
    counter = iter(range(1_000_000))
    stop = asyncio.Event()
    t0 = time.monotonic()

    async def callbacks(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            payload = make_deliveries(1, f"{run}x{next(counter)}")[0]
            at = time.monotonic() - t0
            sent.append((payload, await post_callback(client, server.url, payload), at))
            await asyncio.sleep(0.01)

    async def completions(client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            text = f"ping {worker} {n}"
            body = {
                "model": "echo",
                "stream": True,
                "messages": [{"role": "user", "content": text}],
            }
            headers = dict(AUTH, **{"x-conversation-id": f"llm-{run}-{worker}"})
            started = time.monotonic()
            try:
                async with client.stream(
                    "POST", server.url + "/v1/chat/completions", json=body, headers=headers
                ) as r:
                    raw = "".join([chunk async for chunk in r.aiter_text()])
                    ok = raw.rstrip().endswith("data: [DONE]") and "ping" in raw
                    llm.append((r.status_code, ok, time.monotonic() - started))
            except httpx.TransportError:
                llm.append((0, False, time.monotonic() - started))
            await asyncio.sleep(0.02)

    # A room bot's recorder (in this process) writes to the same database all along.
    from cvi_agent.bot.recorder import Pending, Recorder
    from cvi_agent.store import EventRecord, SqlStore, UtteranceRecord

    bot_store = SqlStore(url)
    recorder = Recorder(bot_store, retry_max=0.5)
    recorder.start()
    room_events = 0

    async def room() -> None:
        nonlocal room_events
        while not stop.is_set():
            room_events += 1
            n = room_events
            record = EventRecord(
                conversation_id=f"room-{run}",
                source="room",
                kind="conversation.utterance",
                dedupe_key=f"room-{run}:{n}",
                seq=n,
                payload={"n": n},
            )
            speech = UtteranceRecord(
                conversation_id=f"room-{run}", role="user", key=str(n), intended_text=f"line {n}"
            )
            recorder.put(Pending(record, utterance=speech))
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=15) as client:
        load = [asyncio.create_task(callbacks(client)) for _ in range(4)]
        load += [asyncio.create_task(completions(client, w)) for w in range(2)]
        load.append(asyncio.create_task(room()))
        await asyncio.sleep(1.0)
        # A restart, down for about 1.5 s: the store's retries ride it out.
        short = (time.monotonic() - t0, 0.0)
        await asyncio.to_thread(private_pg.stop, "fast")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_pg.start)
        short = (short[0], time.monotonic() - t0)
        await asyncio.sleep(1.0)
        # An outage longer than the retry budget: 503 with Retry-After, never a 500 or a hang.
        long = (time.monotonic() - t0, 0.0)
        await asyncio.to_thread(private_pg.stop, "fast")
        await asyncio.sleep(RETRY_BUDGET + 0.5)
        await asyncio.to_thread(private_pg.start)
        long = (long[0], time.monotonic() - t0)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*load)

        statuses = [o.status for _, o, _ in sent]
        assert set(statuses) <= {200, 503}, sorted({str(s) for s in statuses} - {"200", "503"})
        assert all(o.retry_after for _, o, _ in sent if o.status == 503)
        slowest = max(o.seconds for _, o, _ in sent)
        assert slowest < RETRY_BUDGET * 2 + 2, f"a callback took {slowest:.1f} s"
        assert llm and all(s == 200 and ok for s, ok, _ in llm), llm
        assert max(seconds for _, _, seconds in llm) < 2

        def overlapping(window: tuple[float, float]) -> list[Outcome]:
            return [o for _, o, at in sent if at <= window[1] and at + o.seconds >= window[0]]

        in_short = overlapping(short)
        assert in_short, "no callback was under way during the restart"
        assert [o.status for o in in_short if o.status != 200] == []
        in_long = overlapping(long)
        assert any(o.status == 503 for o in in_long), "the long outage was not felt"
        after = [o for _, o, at in sent if at > long[1] + 0.5]
        assert after and all(o.status == 200 for o in after)

        # Tavus retries what got a 503: now it is stored.
        retried = [p for p, o, _ in sent if o.status == 503]
        again = await post_all(server.url, retried, concurrency=8)
        assert {o.status for o in again} <= {200}
        # ("duplicate" when the row was committed but its effects were not: the 503 said so,
        # and this retry applied them)
        assert all(o.body["status"] in ("stored", "duplicate") for o in again)

        # A fresh delivery after the restart is stored at once.
        fresh = make_deliveries(10, f"{run}after")
        assert {o.status for o in await post_all(server.url, fresh)} == {200}

    keys = await stored_callback_keys(url)
    assert len(keys) == len(set(keys)), "a delivery is stored twice"
    expected = {dedupe_key(p) for p, _, _ in sent} | {dedupe_key(p) for p in fresh}
    assert set(keys) == expected

    # The bot's recorder waited the outages out: every room event and utterance is stored.
    await asyncio.wait_for(recorder.close(), 20)
    try:
        assert recorder.dropped == 0
        assert await bot_store.count_events(f"room-{run}", "room") == room_events
        assert len(await bot_store.list_utterances(f"room-{run}")) == room_events
    finally:
        await bot_store.aclose()

    # Every LLM turn is in the record too, once the turn recorder has caught up.
    store = SqlStore(url)
    try:
        deadline = time.monotonic() + 10
        while (turns := await store.count_events(source="llm")) < len(llm):
            assert time.monotonic() < deadline, f"{turns} of {len(llm)} LLM turns recorded"
            await asyncio.sleep(0.2)
    finally:
        await store.aclose()

    logs = server.log_text()
    assert "Traceback" not in logs, logs[-4000:]
    assert "retrying" in logs  # the outage was felt, and waited out
    print(
        f"\npostgres down {short[1] - short[0]:.2f} s then {long[1] - long[0]:.2f} s; "
        f"{len(sent)} callbacks ({statuses.count(200)} × 200, {statuses.count(503)} × 503, "
        f"slowest {slowest:.2f} s; {len(in_short)} sent during the restart, {len(in_long)} "
        f"during the long outage); {len(llm)} LLM streams, slowest "
        f"{max(s for _, _, s in llm):.2f} s; {len(retried)} retried after a 503; "
        f"{room_events} room events recorded"
    )
