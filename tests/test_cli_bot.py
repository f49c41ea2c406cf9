"""`cvi-agent bot` and `cvi-agent room serve` as a user runs them: real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvi_agent.devtools.fakes.replica import ScriptedPeer, event_type_is
from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from tests.support import PERSONAS

pytestmark = pytest.mark.process

CLI = [sys.executable, "-m", "cvi_agent"]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment; these tests run their bots in local rooms on loopback."""
    values = dict(os.environ)
    values.update(
        CVI_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        CVI_PERSONAS_DIR=str(PERSONAS),
        CVI_VAR_DIR=str(tmp_path / "var"),
        CVI_LOCAL_ROOMS="1",
        PYTHONUNBUFFERED="1",
    )
    values.update(extra)
    return values


def test_unreachable_daily_room_exits_with_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [
            *CLI,
            "bot",
            "--room",
            "daily",
            "--conversation-url",
            "https://nonexistent.invalid/room",
            "--conversation-id",
            "c-unreachable",
            "--join-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env(tmp_path, CVI_ROOM_HOSTS="*.daily.co,nonexistent.invalid"),
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert '{"timestamp"' not in output  # daily's native JSON logs are routed into logging
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "cvi-agent bot: could not join https://nonexistent.invalid/room within 3 s"
    )
    assert elapsed < 15, elapsed  # the 3 s bound plus interpreter start-up on a busy machine


async def test_bot_refuses_rooms_outside_the_allow_list(tmp_path: Path) -> None:
    """Without CVI_LOCAL_ROOMS the bot does not go near a loopback room, and a host outside
    CVI_ROOM_HOSTS is refused too: exit 2, one line naming the setting. Before the check the bot
    connected (and waited out its join timeout: exit 1)."""
    knocks = 0

    async def knock(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal knocks
        knocks += 1
        writer.close()

    listener = await asyncio.start_server(knock, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for url, setting in (
            (f"ws://127.0.0.1:{port}/x", "CVI_LOCAL_ROOMS"),
            ("https://rooms.example.com/x", "CVI_ROOM_HOSTS"),
        ):
            process = await asyncio.create_subprocess_exec(
                *CLI,
                "bot",
                "--conversation-url",
                url,
                "--conversation-id",
                "c-refused",
                "--join-timeout",
                "3",
                stderr=asyncio.subprocess.PIPE,
                cwd=tmp_path,
                env=env(tmp_path, CVI_LOCAL_ROOMS="0"),
            )
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
            last = stderr.decode().strip().splitlines()[-1]
            assert knocks == 0, "the bot connected to a loopback address"
            assert process.returncode == 2, stderr.decode()
            assert last.startswith("cvi-agent bot: ") and setting in last, last
            assert "Traceback" not in stderr.decode()
    finally:
        listener.close()


def test_unknown_persona_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *CLI,
            "bot",
            "--conversation-url",
            "ws://127.0.0.1:9/x",
            "--conversation-id",
            "c",
            "--persona",
            "nobody",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env(tmp_path),
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("cvi-agent bot: unknown persona 'nobody' (known: ")
    )


async def test_local_bot_logs_what_it_hears_and_sends(tmp_path: Path) -> None:
    async with LocalRoomServer() as server:
        url = server.room_url("demo")
        human = await ScriptedPeer(url, user_name="Alice").join()
        replica = await ScriptedPeer(
            url, conversation_id="c-cli", user_name="Cora the Concierge"
        ).join()
        process = await asyncio.create_subprocess_exec(
            *CLI,
            "bot",
            "--conversation-url",
            url,
            "--conversation-id",
            "c-cli",
            "--persona",
            "concierge",
            "--leave-grace",
            "0.5",
            "--stdin",
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=env(tmp_path),
        )
        assert process.stdin is not None and process.stderr is not None
        try:
            await replica.wait_until(
                lambda: any(
                    p.user_name == "cvi-agent" for p in replica.room.participants().values()
                ),
                within=30,
            )
            await replica.say(
                "conversation.utterance",
                {"role": "user", "speech": "Weather in Oslo?"},
                inference_id="u1",
            )
            await replica.say(
                "conversation.tool_call",
                {
                    "name": "get_current_weather",
                    "arguments": '{"location": "Oslo"}',
                    "tool_call_id": "call_1",
                },
                inference_id="u1",
            )
            result = await replica.wait_for(event_type_is("conversation.tool_result"), within=10)
            assert json.loads(result["properties"]["output"])["location"] == "Oslo"
            process.stdin.write(b'{"type": "echo", "text": "Hello from stdin"}\n')
            await process.stdin.drain()
            echo = await replica.wait_for(event_type_is("conversation.echo"), within=10)
            assert echo == {
                "message_type": "conversation",
                "event_type": "conversation.echo",
                "conversation_id": "c-cli",
                "properties": {"modality": "text", "text": "Hello from stdin"},
            }
            await replica.say(
                "conversation.utterance.streaming",
                {
                    "role": "replica",
                    "speech": "It is cold in",
                    "final": True,
                    "is_interrupted": True,
                },
                inference_id="r1",
            )
            await asyncio.sleep(0.2)
            await human.leave()
            code = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
        log = (await process.stderr.read()).decode()
        await replica.leave()
    assert code == 0, log
    assert "Traceback" not in log
    lines = log.splitlines()
    assert any(line.endswith('← user: "Weather in Oslo?"') for line in lines), log
    assert any("← tool call get_current_weather" in line for line in lines)
    assert any("→ tool result call_1 success" in line for line in lines)
    assert any(line.endswith('→ echo: "Hello from stdin"') for line in lines)
    assert any(line.endswith('← replica (spoken, interrupted): "It is cold in"') for line in lines)
    assert lines[-1] == "cvi-agent bot: left the room: the last human left"
    with sqlite3.connect(tmp_path / "bot.db") as db:
        rows = db.execute(
            "SELECT role, spoken_text, is_interrupted FROM utterances WHERE conversation_id = 'c-cli' ORDER BY id"
        ).fetchall()
        status = db.execute("SELECT status FROM tool_calls WHERE key = 'call_1'").fetchone()
    assert rows == [("user", None, None), ("replica", "It is cold in", 1)]
    assert status == ("success",)


async def test_room_serve_runs_until_terminated(tmp_path: Path) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "room",
        "serve",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env(tmp_path),
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert f"ws://127.0.0.1:{port}" in line
        a, b = LocalRoom(user_name="a"), LocalRoom(user_name="b")
        await a.join(f"ws://127.0.0.1:{port}/r")
        await b.join(f"ws://127.0.0.1:{port}/r")
        assert [p.user_name for p in b.participants().values()] == ["a"]
        await a.leave()
        await b.leave()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()


def test_room_serve_refuses_a_taken_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "room", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env(tmp_path),
            timeout=30,
        )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"cvi-agent room: cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in line and proc.stdout == ""
