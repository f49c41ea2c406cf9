"""Leases and the worker: one bot per conversation, heartbeats, takeover, failure backoff.

In-process tests run on SQLite and the real PostgreSQL; the scale-out test runs real
`cvi-agent serve` and `cvi-agent worker` processes against PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from cvi_agent.bot.worker import BotSpec, Worker
from cvi_agent.bus import InProcessBus, commands_channel, request
from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.protocol.interactions import Echo
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.rooms.policy import RoomPolicy
from cvi_agent.store import EventRecord, Leases, SqlStore, open_store
from tests.bots import RecordingBot
from tests.support import API_KEY, PERSONAS, REDIS_TEST_URL, TAVUS_KEY, eventually, make_settings


async def test_claims_are_exclusive_and_expire(store: SqlStore) -> None:
    leases = Leases(store)
    for n in range(6):
        await leases.offer(f"c{n}", {"conversation_url": f"ws://room/{n}"})
    await leases.offer("c0", {"conversation_url": "ws://room/0", "persona": "echo"})  # idempotent
    second = await open_store(store.url)  # another process's engine
    try:
        other = Leases(second)
        a, b = await asyncio.gather(leases.claim("wa", 30, 4), other.claim("wb", 30, 4))
    finally:
        await second.aclose()
    ids_a = {lease.conversation_id for lease in a}
    ids_b = {lease.conversation_id for lease in b}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 6
    assert len({lease.owner for lease in a + b}) == 6, "every claim has its own owner token"
    assert await leases.claim("wc", 30, 10) == []
    c0 = await leases.get("c0")
    assert c0 is not None and c0.payload["persona"] == "echo" and c0.held()

    # Renewing keeps what is held; a lease that expired is claimed by someone else.
    first = a[0]
    assert await leases.renew([first.owner or ""], 0.2) == {first.owner}
    await asyncio.sleep(0.3)
    [taken] = await leases.claim("wc", 30, 10)
    assert taken.conversation_id == first.conversation_id and taken.owner != first.owner
    assert await leases.renew([first.owner or ""], 30) == set(), "the old owner lost it"
    assert not await leases.finish(first.conversation_id, first.owner)
    assert await leases.release(taken.owner or "", retry_in=60)
    assert await leases.claim("wd", 30, 10) == []  # backing off
    assert await leases.finish(taken.conversation_id)
    assert await leases.get(taken.conversation_id) is None


def _factory(bots: dict[str, list[RecordingBot]], fail: set[str] | None = None) -> Any:
    def make(spec: BotSpec) -> RecordingBot:
        bot = RecordingBot(spec)
        if fail and spec.conversation_id in fail:

            async def broken(url: str, meeting_token: str | None = None) -> None:
                raise RuntimeError("join failed")

            bot.start = broken  # type: ignore[method-assign]
        bots.setdefault(spec.conversation_id, []).append(bot)
        return bot

    return make


@pytest.fixture
async def workers(store: SqlStore) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    started: list[Worker] = []
    bus = InProcessBus()

    async def start(bots: dict[str, list[RecordingBot]], **kw: Any) -> Worker:
        published: list[EventRecord] = []

        async def publish(record: EventRecord) -> None:
            published.append(record)

        worker = Worker(
            store=store,
            bus=bus,
            personas={},
            publish=publish,
            factory=_factory(bots, kw.pop("fail", None)),
            room_policy=RoomPolicy(hosts=("room",)),  # the leases' ws://room/… URLs
            poll_interval=0.05,
            lease_seconds=kw.pop("lease_seconds", 0.6),
            **kw,
        )
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.aclose()


async def test_worker_runs_commands_and_hands_over(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await store.upsert_conversation("c1", persona="echo")
    await leases.offer("c1", {"conversation_url": "ws://room/c1"})
    w1 = await workers(bots, worker_id="w1")

    async def running(worker: Worker) -> bool:
        rb = worker.running.get("c1")
        return rb is not None and bots["c1"][-1].started.is_set()

    await eventually(lambda: running(w1))
    bus = w1.bus

    async def echo(text: str) -> dict[str, Any] | None:
        command = {"op": "send", "interaction": {"type": "echo", "text": text}}
        _, reply = await request(bus, commands_channel("c1"), command, f"r-{text}", 2)
        return reply

    reply = await eventually(lambda: echo("one"))
    assert reply["ok"] and reply["worker"] == "w1"
    assert bots["c1"][0].sent == [Echo(text="one")]
    assert (await echo("one")) == reply, "a repeated command id is answered, not re-sent"
    assert len(bots["c1"][0].sent) == 1

    # Heartbeats keep the lease past its length; a second worker does not take it.
    w2 = await workers(bots, worker_id="w2")
    await asyncio.sleep(1.5)
    assert "c1" not in w2.running and len(bots["c1"]) == 1

    # w1 stalls (no heartbeats: as if killed): w2 takes over after the lease expires, and w1
    # stops its bot when it finds its lease gone.
    w1._stopping = True
    assert w1._task is not None
    w1._task.cancel()
    await eventually(lambda: running(w2))
    assert len(bots["c1"]) == 2
    await w1.heartbeat()
    await eventually(lambda: _value(bots["c1"][0].stopped == "lease_lost"))
    reply = await eventually(lambda: echo("two"))
    assert reply["worker"] == "w2" and bots["c1"][1].sent == [Echo(text="two")]

    # Told to stop (as `POST …/end` does): the bot stops and its lease is removed.
    await leases.finish("c1")
    await bus.publish(commands_channel("c1"), {"op": "stop", "reason": "api_end"})
    await eventually(lambda: _value(bots["c1"][1].stopped == "api_end"))
    await eventually(lambda: _value("c1" not in w2.running))
    assert await leases.get("c1") is None
    kinds = [e.kind for e in await store.list_events("c1", order="id")]
    assert kinds.count("worker.started") == 2


async def _value(value: bool) -> bool:
    return value


async def test_failing_bot_backs_off_and_ended_conversations_are_skipped(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await leases.offer("bad", {"conversation_url": "ws://room/bad"})
    await store.set_conversation_status("over", "ended")
    await leases.offer("over", {"conversation_url": "ws://room/over"})
    await workers(bots, worker_id="w1", fail={"bad"})

    async def failed_once() -> bool:
        lease = await leases.get("bad")
        return lease is not None and lease.payload.get("attempts") == 1

    await eventually(failed_once)
    lease = await leases.get("bad")
    assert lease is not None and not lease.held() and lease.expires_at > time.time() + 1
    assert "join failed" in lease.payload["last_error"]
    await eventually(lambda: _none(leases.get("over")))
    assert "over" not in bots
    kinds = [e.kind for e in await store.list_events("bad", order="id")]
    assert "worker.failed" in kinds


async def _none(value: Awaitable[Any]) -> bool:
    return (await value) is None


async def test_graceful_shutdown_releases_at_once(
    store: SqlStore, workers: Callable[..., Awaitable[Worker]]
) -> None:
    bots: dict[str, list[RecordingBot]] = {}
    leases = Leases(store)
    await leases.offer("c1", {"conversation_url": "ws://room/c1"})
    w1 = await workers(bots, worker_id="w1", lease_seconds=30)
    await eventually(lambda: _value("c1" in w1.running))
    await w1.aclose()
    assert bots["c1"][0].stopped == "worker_shutdown"
    lease = await leases.get("c1")
    assert lease is not None and lease.owner is None and not lease.held()
    w2 = await workers(bots, worker_id="w2", lease_seconds=30)
    await eventually(lambda: _value("c1" in w2.running))  # no 30 s wait


# -- scale-out: real processes, PostgreSQL, Redis ---------------------------------------------


class Processes:
    """`cvi-agent` subprocesses with their output in files; every one is killed at the end."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *args: str, **env: str) -> asyncio.subprocess.Process:
        log = (self.directory / f"{name}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cvi_agent",
            *args,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    async def wait_for_output(self, name: str, text: str, within: float = 30) -> None:
        async def seen() -> bool:
            if self.procs[name].returncode is not None:
                raise AssertionError(f"{name} exited:\n{self.output(name)[-3000:]}")
            return text in self.output(name)

        await eventually(seen, within)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(proc.wait(), 10)

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.output(name)[-4000:]}" for name in self.procs)


async def _healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            return (await http.get(url + "/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.postgres
@pytest.mark.redis
async def test_scale_out_two_web_processes_and_workers(
    pg_url: str, tmp_path: Path, fake_tavus: Any
) -> None:
    """Web A and web B and worker W1 as real processes on PostgreSQL and Redis: a live feed on A
    sees a callback posted to B; an echo posted to B reaches W1's bot in the room; W1 is killed
    (SIGKILL) and W2 takes the conversation over once the lease expires."""
    from cvi_agent.devtools.fakes.replica import ScriptedPeer

    await _require_redis()
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    env = {
        **os.environ,
        "CVI_DATABASE_URL": pg_url,
        "CVI_REDIS_URL": REDIS_TEST_URL,
        "CVI_API_KEYS": API_KEY,
        "CVI_CALLBACK_TOKEN": "cb-scale-0123456789",
        "CVI_PERSONAS_DIR": str(PERSONAS),
        "CVI_VAR_DIR": str(tmp_path / "var"),
        "CVI_PUBLIC_URL": url_b,  # Tavus calls back to B
        "TAVUS_API_KEY": TAVUS_KEY,
        "TAVUS_API_URL": fake_tavus.url,
        "CVI_RUN_WORKER": "0",
        "CVI_LEASE_SECONDS": "1.5",
        "CVI_WORKER_POLL_INTERVAL": "0.2",
        "CVI_LOG_LEVEL": "info",
        "CVI_LOCAL_ROOMS": "1",  # the fake Tavus hands out a local room's URL
        "PYTHONUNBUFFERED": "1",
    }
    procs = Processes(tmp_path, env)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with asyncio.timeout(90), LocalRoomServer() as rooms:
            room_url = rooms.room_url("scale-out")
            fake_tavus.conversation_url = room_url
            await procs.start("web-a", "serve", "--port", str(port_a))
            await procs.start("web-b", "serve", "--port", str(port_b))
            await procs.start("worker-1", "worker", "--id", "worker-1")
            await eventually(lambda: _healthy(url_a), 30)
            await eventually(lambda: _healthy(url_b), 30)
            await procs.wait_for_output("worker-1", "ready")

            replica = ScriptedPeer(room_url, user_name="Iris the Interviewer")
            human = ScriptedPeer(room_url, user_name="Alice", user_id="user-alice")
            await human.join()
            await replica.join()
            try:
                async with httpx.AsyncClient(timeout=15) as http:
                    resp = await http.post(
                        url_a + "/api/conversations",
                        json={"persona": "interviewer"},
                        headers=auth,
                    )
                    assert resp.status_code == 201, resp.text
                    cid = resp.json()["conversation"]["id"]

                    def bots_joined() -> int:
                        return sum(p.user_name == "cvi-agent" for p in replica.inbox.joined)

                    await replica.wait_until(lambda: bots_joined() == 1, 30)

                    ws_url = url_a.replace("http://", "ws://")
                    async with connect(
                        f"{ws_url}/api/conversations/{cid}/live?key={API_KEY}"
                    ) as ws:
                        await _until(ws, lambda m: m.get("type") == "live")
                        # Tavus → B; the live feed on A sees it.
                        status = await fake_tavus.send_callback(
                            cid, "system.replica_joined", {"replica_id": "r79e1c033f"}
                        )
                        assert status == 200
                        event = await _until(ws, _kind("system.replica_joined"))
                        assert event["event"]["source"] == "callback"

                        # An echo posted to B reaches the bot in the worker, then the room.
                        sent = await http.post(
                            f"{url_b}/api/conversations/{cid}/interactions",
                            json={"type": "echo", "text": "Hello from B"},
                            headers=auth,
                        )
                        assert sent.status_code == 200, sent.text
                        assert sent.json()["worker"] == "worker-1"
                        heard = await replica.wait_for(_echo("Hello from B"), 10)
                        assert heard["conversation_id"] == cid
                        # ...and what the bot recorded reaches A's feed through Redis.
                        await _until(ws, _kind("interaction.conversation.echo"))

                    # A standby worker; then W1 dies without a word.
                    await procs.start("worker-2", "worker", "--id", "worker-2")
                    await procs.wait_for_output("worker-2", "ready")
                    procs.kill("worker-1")
                    await replica.wait_until(lambda: bots_joined() == 2, 30)

                    async def echo_after_takeover() -> httpx.Response | None:
                        r = await http.post(
                            f"{url_a}/api/conversations/{cid}/interactions",
                            json={"type": "echo", "text": "Hello after takeover"},
                            headers={**auth, "Idempotency-Key": "takeover-1"},
                        )
                        if r.status_code == 503:
                            return None
                        return r

                    after = await eventually(echo_after_takeover, 20)
                    assert after.status_code == 200, after.text
                    assert after.json()["worker"] == "worker-2"
                    await replica.wait_for(_echo("Hello after takeover"), 10)

                    record = (
                        await http.get(f"{url_a}/api/conversations/{cid}", headers=auth)
                    ).json()
                    owners = [
                        e["payload"]["worker"]
                        for e in record["events"]
                        if e["kind"] == "worker.started"
                    ]
                    assert owners == ["worker-1", "worker-2"]
                    assert record["bot"]["held"] is True
                    assert record["conversation"]["status"] == "live"
            finally:
                await human.leave()
                await replica.leave()
    except BaseException:
        print(procs.logs())
        raise
    finally:
        await procs.aclose()


async def _require_redis() -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        await client.ping()
    except (OSError, redis.ConnectionError) as exc:
        pytest.fail(f"Redis is required at {REDIS_TEST_URL} ({exc}); start it, see README")
    finally:
        await client.aclose()


def _kind(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "event" and m["event"]["kind"] == kind


def _echo(text: str) -> Callable[[Any], bool]:
    return lambda m: (
        isinstance(m, dict)
        and m.get("event_type") == "conversation.echo"
        and m.get("properties", {}).get("text") == text
    )


async def _until(ws: Any, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if match(message):
            return message


async def test_single_process_default_mode(tmp_path: Path, fake_tavus: Any) -> None:
    """`cvi-agent serve` alone (SQLite, in-process bus, in-process worker, the real bot):
    create → the bot joins the room → an interaction reaches the replica → end."""
    from cvi_agent.app import create_app
    from cvi_agent.devtools.fakes.replica import ScriptedPeer
    from cvi_agent.devtools.fakes.server import LoopbackServer

    async with asyncio.timeout(60), LocalRoomServer() as rooms:
        room_url = rooms.room_url("single")
        fake_tavus.conversation_url = room_url
        port = free_port()
        settings = make_settings(
            tmp_path,
            public_url=f"http://127.0.0.1:{port}",
            callback_token="cb-single-0123456789",
            tavus_api_key=TAVUS_KEY,
            tavus_api_url=fake_tavus.url,
            worker_poll_interval=0.2,
            local_rooms=True,  # the fake Tavus hands out a local room's URL
        )
        replica = ScriptedPeer(room_url, user_name="Cora the Concierge")
        human = ScriptedPeer(room_url, user_name="Alice", user_id="user-alice")
        await human.join()
        await replica.join()
        auth = {"Authorization": f"Bearer {API_KEY}"}
        try:
            with LoopbackServer(create_app(settings), port=port) as server:
                async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
                    resp = await http.post(
                        "/api/conversations", json={"persona": "concierge"}, headers=auth
                    )
                    assert resp.status_code == 201, resp.text
                    cid = resp.json()["conversation"]["id"]
                    await replica.wait_until(
                        lambda: any(p.user_name == "cvi-agent" for p in replica.inbox.joined), 20
                    )

                    async def respond() -> httpx.Response | None:
                        r = await http.post(
                            f"/api/conversations/{cid}/interactions",
                            json={"type": "respond", "text": "What's the weather in Oslo?"},
                            headers={**auth, "Idempotency-Key": "single-1"},
                        )
                        return None if r.status_code == 503 else r

                    sent = await eventually(respond, 10)
                    assert sent.status_code == 200, sent.text
                    heard = await replica.wait_for(
                        lambda m: (
                            isinstance(m, dict) and m.get("event_type") == "conversation.respond"
                        ),
                        10,
                    )
                    assert heard["properties"] == {"text": "What's the weather in Oslo?"}
                    ended = await http.post(f"/api/conversations/{cid}/end", headers=auth)
                    assert ended.status_code == 200 and ended.json()["bot_stopped"] is True
                    await replica.wait_until(
                        lambda: any(p.user_name == "cvi-agent" for p in replica.inbox.left), 15
                    )
        finally:
            await human.leave()
            await replica.leave()
