"""A simulation end to end against the real server: every turn answered, a tool call round trip,
an interruption recorded, callbacks stored, all visible through the API."""

from __future__ import annotations

import asyncio
import gc
import time
import types
from typing import Any

import httpx

from cvi_agent.devtools.simulate.engine import Simulation
from cvi_agent.devtools.simulate.report import render_table
from cvi_agent.devtools.simulate.script import Script, Step, load_script
from cvi_agent.personas import load_personas
from cvi_agent.rooms.local_server import LocalRoomServer
from tests.support import API_KEY, PERSONAS, ServerFactory

TOKEN = "cb-token-for-tests"


async def test_simulated_conversation_is_recorded(serve: ServerFactory) -> None:
    server = serve(None, callback_token=TOKEN, local_rooms=True)
    script = load_script().model_copy(update={"words_per_second": 60})
    persona = load_personas(PERSONAS)[script.persona]
    lines: list[str] = []
    async with LocalRoomServer("127.0.0.1", 0) as rooms:
        simulation = Simulation(
            server_url=server.url,
            api_key=API_KEY,
            callback_token=TOKEN,
            room_url=rooms.room_url("sim-test"),
            script=script,
            persona_name=persona.persona_name,
            system_prompt=persona.system_prompt,
            tools=[t.openai_tool() for t in persona.client_tools()],  # as Tavus sends them
            conversation_id="sim-test",
            printer=lines.append,
        )
        report = await simulation.run()
    assert report.errors == [], report.errors
    table = render_table(report)
    assert "interruptions 1" in table and "tool calls 2" in table

    user_turns = [t for t in report.turns if t.kind in ("user", "respond")]
    assert len(user_turns) == sum(1 for s in script.turns if s.user or s.respond)
    assert all(t.reply for t in report.turns), "every turn was answered"
    assert all(
        t.requests >= 2 for t in report.turns if t.kind == "user" and len(t.text.split()) > 1
    )
    assert report.callbacks == {
        "system.replica_joined": 200,
        "system.shutdown": 200,
        "application.transcription_ready": 200,
    }

    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        record: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the bot's recorder writes in batches
            record = (await http.get("/api/conversations/sim-test")).json()
            if any(u["is_interrupted"] for u in record["utterances"]) and record["tool_calls"]:
                break
    assert record["conversation"]["status"] == "ended"
    assert record["conversation"]["shutdown_reason"].startswith("end_conversation_endpoint_hit")
    # the tool call round trip: the replica's conversation.tool_call answered by the bot
    calls = record["tool_calls"]
    assert [c["name"] for c in calls] == ["get_current_weather", "get_current_weather"]
    assert all(c["status"] == "success" for c in calls)
    assert "Paris" in calls[0]["output"]
    # the interruption: the intended reply vs what was actually spoken
    [cut] = [u for u in record["utterances"] if u["is_interrupted"]]
    assert cut["role"] in ("replica", "assistant")
    assert len(cut["spoken_text"].split()) == 4
    assert cut["intended_text"].startswith(cut["spoken_text"])
    assert len(cut["intended_text"]) > len(cut["spoken_text"])
    # the transcript callback, joined with what the bot heard
    transcript = record["transcript"]
    assert transcript["source"] == "tavus"
    interrupted_lines = [e for e in transcript["entries"] if e.get("interrupted")]
    assert len(interrupted_lines) == 1 and interrupted_lines[0]["spoken_text"] == cut["spoken_text"]
    kinds = {e["kind"] for e in record["events"]}
    assert {
        "conversation.utterance",
        "conversation.tool_call",
        "interaction.conversation.echo",
        "interaction.conversation.interrupt",
        "llm.turn",
        "system.shutdown",
    } <= kinds
    # the echo sent through the API was spoken by the replica
    assert any("breakfast buffet" in (u["text"] or "") for u in record["utterances"])

    # Both delivery paths, as the script asks: over REST (the stand-in for Tavus's API hands
    # them to the replica, not the room) and through the bot, each with its latency.
    legs = report.summary()["interactions"]
    assert set(legs) == {"rest", "bot"}, legs
    assert legs["rest"]["count"] == 3 and legs["bot"]["count"] == 3
    assert legs["rest"]["lost"] == legs["bot"]["lost"] == 0
    assert all(i.via == i.asked for i in report.interactions)
    assert all(i.replica_ms is not None and i.replica_ms >= 0 for i in report.interactions)
    assert "interactions via rest: 3" in table and "interactions via bot: 3" in table
    by_source = {
        (e["source"], e["kind"])
        for e in record["events"]
        if e["kind"].startswith("interaction.conversation.")
    }
    assert {
        ("api", "interaction.conversation.interrupt"),
        ("api", "interaction.conversation.echo"),
        ("api", "interaction.conversation.overwrite_llm_context"),
        ("bot", "interaction.conversation.echo"),
        ("bot", "interaction.conversation.append_llm_context"),
        ("bot", "interaction.conversation.respond"),
    } <= by_source
    assert ("bot", "interaction.conversation.interrupt") not in by_source
    assert any("pool is open" in (u["text"] or "") for u in record["utterances"])


async def test_turns_answered_by_the_fallback_line_are_errors(serve: ServerFactory) -> None:
    """Fails before: with the upstream unreachable, `weather` answered every turn with its
    fallback line and the run reported `errors 0`. Each turn that fell back is an error of the
    run, with its cause, and the milestones reach `notify` (what the console charts)."""
    server = serve(None, callback_token=TOKEN, local_rooms=True)  # upstream: 127.0.0.1:9
    script = Script(
        persona="weather",
        words_per_second=200,
        partials=1,
        turns=[Step(user="Hello there"), Step(user="Is it raining in Paris?")],
    )
    persona = load_personas(PERSONAS)["weather"]
    told: list[tuple[str, dict[str, Any]]] = []

    async def notify(kind: str, payload: dict[str, Any]) -> None:
        told.append((kind, payload))

    async with LocalRoomServer("127.0.0.1", 0) as rooms:
        simulation = Simulation(
            server_url=server.url,
            api_key=API_KEY,
            callback_token=TOKEN,
            room_url=rooms.room_url("sim-fallback"),
            script=script,
            persona_name=persona.persona_name,
            system_prompt=persona.system_prompt,
            conversation_id="sim-fallback",
            notify=notify,
        )
        report = await simulation.run()
    assert [t.fallback is not None for t in report.turns] == [True, True]
    assert report.summary()["fallbacks"] == 2 and report.summary()["errors"] == 2
    for error in report.errors:  # partials: 1, so no speculative requests
        assert "fell back (upstream_unavailable)" in error, error
        assert "could not connect to 127.0.0.1:9: connection refused" in error, error
    table = render_table(report)
    assert "fallbacks 2, errors 2" in table and "fell back" in table
    kinds = [kind for kind, _ in told]
    assert kinds == ["simulation.turn", "simulation.turn", "simulation.script_finished"]
    first = told[0][1]
    assert first["ttft_ms"] is not None and first["u2u_ms"] is not None
    assert first["completion_id"].startswith("chatcmpl-")


def _suspended_client_generators() -> list[str]:
    """The HTTP clients' async generators still suspended (not run to their end, not closed):
    each is work left to whichever thread's garbage collection finds it."""
    left = []
    for obj in gc.get_objects():
        if type(obj) is types.AsyncGeneratorType and obj.ag_frame is not None:
            where = obj.ag_code.co_filename
            if any(f"/{lib}/" in where for lib in ("openai", "httpx", "httpx2", "httpcore")):
                left.append(f"{obj.ag_code.co_qualname} ({where}:{obj.ag_frame.f_lineno})")
    return left


async def test_abandoned_speculative_requests_leave_nothing_to_the_garbage_collector(
    serve: ServerFactory,
) -> None:
    """Fails before: each speculative request, abandoned after its first chunk, left its
    stream's async generators suspended in a reference cycle (the SDK's stream and its own
    generator). `cvi-agent simulate` runs the server in the same process, on another thread:
    when a collection there found them, it handed their closing to this loop and went on
    finalizing the same generators while this loop was closing them, which printed
    `Exception ignored in: <async_generator …>: async generator already executing` on stderr
    now and then. Every request's stream is closed by the time the turn is over."""
    server = serve(None, callback_token=TOKEN, local_rooms=True)
    script = Script(
        words_per_second=200,
        partials=4,
        turns=[Step(user="I would like a table for two tonight, please")],
    )
    persona = load_personas(PERSONAS)[script.persona]
    gc.collect()
    gc.disable()  # what is left stays visible: no collection may run meanwhile
    try:
        async with LocalRoomServer("127.0.0.1", 0) as rooms:
            simulation = Simulation(
                server_url=server.url,
                api_key=API_KEY,
                callback_token=TOKEN,
                room_url=rooms.room_url("sim-gc"),
                script=script,
                persona_name=persona.persona_name,
                system_prompt=persona.system_prompt,
                conversation_id="sim-gc",
            )
            report = await simulation.run()
        for _ in range(10):  # closings handed to the loop (finalized by reference count)
            await asyncio.sleep(0)
        left = _suspended_client_generators()
    finally:
        gc.enable()
    assert report.errors == [], report.errors
    assert report.turns[0].requests == 4  # three speculative requests, then the final one
    assert left == [], "\n".join(left)
