"""An offline stand-in for Tavus: a simulated user and replica in a `LocalRoom`, against the real
server (its LLM endpoint, its bot, its callback endpoint).

What it does, per user turn of the script:

1. The user "speaks": progressive partial transcripts go to `/v1/chat/completions` as Tavus's
   speculative inference sends them (each a longer prefix, each abandoned after its first chunk),
   then the final request, whose reply is spoken.
2. The replica "speaks" the reply in the room: `utterance` (intended text), progressive
   `utterance.streaming` and a final one (with `is_interrupted`), started/stopped speaking with
   durations from the word count. A client tool call is broadcast as `conversation.tool_call`;
   the bot's `conversation.tool_result` comes back and the reply continues with it.
3. Interactions the bot sends into the room are honoured: echo is spoken, interrupt cuts the reply
   short, respond starts a turn, overwrite/append context change the next request's system message.

The server's bot joins the same room (attached through `POST /api/conversations`) and records
everything; at the end the simulator posts `system.shutdown` and `application.transcription_ready`
to the callback endpoint, so the conversation reads like a real one in the API and the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import yaml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cvi_agent.rooms.base import Participant, RoomListener
from cvi_agent.rooms.local import LocalRoom
from cvi_agent.rooms.local_server import LocalRoomServer
from cvi_agent.runtime import get_runtime
from cvi_agent.web.http import (
    ApiError,
    check_api_key,
    presented_key,
    read_json_object,
    validation_message,
)

log = logging.getLogger(__name__)

DEFAULT_SCRIPT = Path(__file__).parent / "data" / "simulation.yaml"


class Step(BaseModel):
    """One step of a script: exactly one of user / echo / respond / overwrite / append."""

    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(default=None, min_length=1, max_length=2000)
    echo: str | None = Field(default=None, min_length=1, max_length=2000)
    respond: str | None = Field(default=None, min_length=1, max_length=2000)
    overwrite_context: str | None = Field(default=None, max_length=20_000)
    append_context: str | None = Field(default=None, min_length=1, max_length=20_000)
    interrupt_after_words: int | None = Field(default=None, ge=1, le=1000)
    pause: float = Field(default=0.0, ge=0, le=30)

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [self.user, self.echo, self.respond, self.overwrite_context, self.append_context]
        if sum(a is not None for a in actions) != 1:
            raise ValueError(
                "each step needs exactly one of user, echo, respond, overwrite_context, "
                "append_context"
            )
        if self.interrupt_after_words is not None and self.user is None:
            raise ValueError("interrupt_after_words goes with a user step")
        return self


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str = "concierge"
    user_name: str = "Maya"
    words_per_second: float = Field(default=12.0, gt=0, le=1000)
    partials: int = Field(default=3, ge=1, le=10)
    conversational_context: str = ""
    turns: list[Step] = Field(min_length=1, max_length=500)


def load_script(path: Path | None = None) -> Script:
    path = path or DEFAULT_SCRIPT
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Script.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the script: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {loc}: {first['msg']}") from exc


@dataclass
class TurnReport:
    index: int
    kind: str  # user | respond | echo | tool
    text: str
    reply: str = ""
    requests: int = 0  # LLM requests for this turn (speculative + final)
    ttft_ms: float | None = None  # final request: time to first token
    u2u_ms: float | None = None  # user stopped speaking → replica started speaking
    interrupted: bool = False
    tool: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "text": self.text,
            "reply": self.reply,
            "requests": self.requests,
            "ttft_ms": self.ttft_ms,
            "u2u_ms": self.u2u_ms,
            "interrupted": self.interrupted,
            "tool": self.tool,
        }


@dataclass
class SimulationReport:
    conversation_id: str
    persona: str
    turns: list[TurnReport] = field(default_factory=list)
    callbacks: dict[str, int] = field(default_factory=dict)
    recorded: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ttfts = [t.ttft_ms for t in self.turns if t.ttft_ms is not None]
        u2us = [t.u2u_ms for t in self.turns if t.u2u_ms is not None]

        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

        return {
            "turns": len(self.turns),
            "llm_requests": sum(t.requests for t in self.turns),
            "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
            "ttft_ms_p95": pct(ttfts, 0.95),
            "u2u_ms_p50": round(statistics.median(u2us), 1) if u2us else None,
            "u2u_ms_p95": pct(u2us, 0.95),
            "interruptions": sum(t.interrupted for t in self.turns),
            "tool_calls": sum(t.tool is not None for t in self.turns),
            "errors": len(self.errors),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "persona": self.persona,
            "duration_s": round(self.duration_s, 2),
            "summary": self.summary(),
            "turns": [t.as_dict() for t in self.turns],
            "callbacks": self.callbacks,
            "recorded": self.recorded,
            "errors": self.errors,
        }


Printer = Callable[[str], None]


class _ReplicaInbox(RoomListener):
    """Room callbacks for the simulated replica: every interaction lands in one queue."""

    def __init__(self, simulated_ids: tuple[str, ...]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.bot_present = asyncio.Event()
        self.simulated_ids = simulated_ids

    def on_app_message(self, message: Any, sender: str | None) -> None:
        if isinstance(message, str):
            with contextlib.suppress(ValueError):
                message = json.loads(message)
        if isinstance(message, dict) and message.get("message_type") == "conversation":
            self.queue.put_nowait(message)

    def on_participant_joined(self, participant: Participant) -> None:
        if participant.user_id not in self.simulated_ids:
            self.bot_present.set()


class Simulation:
    """One simulated conversation against a running server."""

    def __init__(
        self,
        *,
        server_url: str,
        api_key: str,
        callback_token: str | None,
        room_url: str,
        script: Script,
        persona_name: str,
        system_prompt: str,
        conversation_id: str | None = None,
        printer: Printer | None = None,
        linger: float = 0.0,
        bot_timeout: float = 15.0,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.callback_token = callback_token
        self.room_url = room_url
        self.script = script
        self.persona_display = persona_name
        self.conversation_id = conversation_id or "sim-" + secrets.token_hex(5)
        self.print = printer or (lambda line: None)
        self.linger = linger
        self.bot_timeout = bot_timeout
        self.report = SimulationReport(self.conversation_id, script.persona)
        self.base_system = system_prompt
        self.context = script.conversational_context
        self.history: list[dict[str, Any]] = []
        self.transcript: list[dict[str, Any]] = []
        self._seq = 0
        self._turn_idx = 0
        self._speech = asyncio.Lock()
        self._interrupt = asyncio.Event()
        self._tool_results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._echoes_spoken: list[str] = []
        self._echo_spoken = asyncio.Condition()
        self._started = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.replica = LocalRoom(
            user_name=persona_name, user_id="tavus-replica-sim", join_timeout=10
        )
        self.inbox = _ReplicaInbox(("tavus-replica-sim", "sim-user"))
        self.replica.listener = self.inbox
        self.human = LocalRoom(user_name=script.user_name, user_id="sim-user", join_timeout=10)
        self.http = httpx.AsyncClient(
            base_url=self.server_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=15
        )
        import openai  # here, not at the top: the server imports this module's router

        self.llm = openai.AsyncOpenAI(
            base_url=self.server_url + "/v1",
            api_key=api_key,
            max_retries=0,
            default_headers={"x-conversation-id": self.conversation_id},
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- room events -----------------------------------------------------------------------

    def _system_message(self) -> dict[str, Any]:
        parts = [
            "You are in a live video conference call with a user. Reply in short sentences.",
            self.base_system,
            self.context,
        ]
        return {"role": "system", "content": " ".join(p for p in parts if p)}

    async def _emit(
        self, event_type: str, properties: dict[str, Any] | None, inference_id: str | None
    ) -> None:
        self._seq += 1
        message: dict[str, Any] = {
            "message_type": "conversation",
            "event_type": event_type,
            "conversation_id": self.conversation_id,
            "seq": self._seq,
            "turn_idx": self._turn_idx,
            "timestamp": time.time(),
        }
        if inference_id is not None:
            message["inference_id"] = inference_id
        if properties is not None:
            message["properties"] = properties
        await self.replica.send_app_message(message)

    def _word_delay(self) -> float:
        return 1.0 / self.script.words_per_second

    async def _user_speaks(self, text: str, inference_id: str) -> None:
        await self._emit("conversation.user.started_speaking", {"role": "user"}, inference_id)
        await self._emit("conversation.started_speaking", {"role": "user"}, inference_id)
        await self._emit("conversation.utterance", {"role": "user", "speech": text}, inference_id)
        words = len(text.split())
        duration = round(words * self._word_delay(), 3)
        await self._emit(
            "conversation.stopped_speaking",
            {"role": "user", "interrupted": False, "duration": duration},
            inference_id,
        )
        await self._emit("conversation.user.stopped_speaking", {"role": "user"}, inference_id)
        self.transcript.append({"role": "user", "content": text, "inference_id": inference_id})

    async def _replica_speaks(
        self, text: str, inference_id: str, interrupt_after: int | None = None
    ) -> tuple[str, bool]:
        """Speak `text` word by word; returns (what was actually said, interrupted)."""
        words = text.split()
        if not words:
            return "", False
        self._interrupt.clear()
        started = time.monotonic()
        await self._emit("conversation.started_speaking", {"role": "replica"}, inference_id)
        await self._emit(
            "conversation.utterance", {"role": "replica", "speech": text}, inference_id
        )
        spoken: list[str] = []
        interrupted = False
        for i, word in enumerate(words):
            if self._interrupt.is_set():
                interrupted = True
                break
            spoken.append(word)
            if interrupt_after is not None and len(spoken) == interrupt_after:
                # Hold here until the interrupt sent through the API arrives (bounded).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interrupt.wait(), timeout=10)
                if self._interrupt.is_set() and i < len(words) - 1:
                    interrupted = True
                    break
            if len(spoken) % 4 == 0:
                await self._emit(
                    "conversation.utterance.streaming",
                    {
                        "role": "replica",
                        "speech": " ".join(spoken),
                        "content_index": 0,
                        "final": False,
                        "is_interrupted": False,
                    },
                    inference_id,
                )
            await asyncio.sleep(self._word_delay())
        said = " ".join(spoken)
        await self._emit(
            "conversation.utterance.streaming",
            {
                "role": "replica",
                "speech": said,
                "content_index": 0,
                "final": True,
                "is_interrupted": interrupted,
            },
            inference_id,
        )
        await self._emit(
            "conversation.stopped_speaking",
            {
                "role": "replica",
                "interrupted": interrupted,
                "duration": round(time.monotonic() - started, 3),
            },
            inference_id,
        )
        # Tavus's transcript holds what the LLM meant to say; the bot saw what was spoken.
        self.transcript.append({"role": "assistant", "content": text, "inference_id": inference_id})
        return said, interrupted

    # -- the LLM, as Tavus calls it --------------------------------------------------------

    async def _speculative(self, messages: list[dict[str, Any]]) -> None:
        """A request that is abandoned after its first chunk, as a speculative one is."""
        import openai

        try:
            stream = await self.llm.chat.completions.create(
                model=self.script.persona, stream=True, messages=cast(Any, messages)
            )
            async with stream:
                async for _chunk in stream:
                    break
        except openai.APIError as exc:
            self.report.errors.append(f"speculative request failed: {exc}")

    async def _final(
        self, messages: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, str]], float, float]:
        """The request whose reply is spoken: (text, client tool calls, ttft s, first-token time)."""
        started = time.monotonic()
        first: float | None = None
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        stream = await self.llm.chat.completions.create(
            model=self.script.persona, stream=True, messages=cast(Any, messages)
        )
        async with stream:
            async for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if (delta.content or delta.tool_calls) and first is None:
                    first = time.monotonic()
                if delta.content:
                    text.append(delta.content)
                for tc in delta.tool_calls or []:
                    call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] = tc.id or call["id"]
                    if tc.function is not None:
                        call["name"] = tc.function.name or call["name"]
                        call["arguments"] += tc.function.arguments or ""
        first = first or time.monotonic()
        return "".join(text), [calls[i] for i in sorted(calls)], first - started, first

    async def _turn(self, kind: str, text: str, interrupt_after: int | None = None) -> None:
        """One user turn (or a `respond`): speculative requests, the final one, the reply."""
        self._turn_idx += 1
        inference_id = secrets.token_hex(8)
        report = TurnReport(len(self.report.turns) + 1, kind, text)
        self.report.turns.append(report)
        self.print(f"  {self.script.user_name if kind == 'user' else 'respond'}: {text}")
        words = text.split()
        if kind == "user":
            partials = min(self.script.partials, len(words))
            for k in range(1, partials):
                prefix = " ".join(words[: max(1, len(words) * k // partials)])
                await self._speculative(
                    [self._system_message(), *self.history, {"role": "user", "content": prefix}]
                )
                report.requests += 1
            await self._user_speaks(text, inference_id)
        self.history.append({"role": "user", "content": text})
        stopped = time.monotonic()
        reply, calls, ttft, first_at = await self._final([self._system_message(), *self.history])
        report.requests += 1
        report.ttft_ms = round(ttft * 1000, 1)
        # The replica starts speaking with the first token (TTS streams): stopped → first token.
        report.u2u_ms = round((first_at - stopped) * 1000, 1)
        if interrupt_after is not None:
            self._spawn(self._interrupt_via_api(interrupt_after))
        said, interrupted = await self._replica_speaks(reply, inference_id, interrupt_after)
        report.reply, report.interrupted = said, interrupted
        line = f"  {self.persona_display}: {said}" + (" [interrupted]" if interrupted else "")
        self.print(line + f"   (ttft {report.ttft_ms:.1f} ms, {report.requests} requests)")
        if calls:
            await self._tool_round(report, reply, calls, inference_id)
        elif said:
            self.history.append({"role": "assistant", "content": said})

    async def _interrupt_via_api(self, after_words: int) -> None:
        # Wait until the replica has said `after_words` words, then interrupt through the API.
        await asyncio.sleep(after_words * self._word_delay())
        try:
            await self.interaction({"type": "interrupt"})
        except Exception as exc:  # reported, never fatal: the replica stops holding after 10 s
            self.report.errors.append(f"interrupt failed: {exc}")

    async def _tool_round(
        self, report: TurnReport, said: str, calls: list[dict[str, str]], inference_id: str
    ) -> None:
        """Broadcast client tool calls; wait for the bot's results; speak the follow-up."""
        loop = asyncio.get_running_loop()
        results: list[dict[str, Any]] = []
        for call in calls:
            call_id = call["id"] or "call_" + secrets.token_hex(6)
            call["id"] = call_id
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._tool_results[call_id] = future
            report.tool = call["name"]
            self.print(f"  → tool call {call['name']}({call['arguments']})")
            await self._emit(
                "conversation.tool_call",
                {"name": call["name"], "arguments": call["arguments"], "tool_call_id": call_id},
                inference_id,
            )
            try:
                results.append(await asyncio.wait_for(future, timeout=self.bot_timeout))
            except TimeoutError:
                self.report.errors.append(
                    f"no tool_result for {call['name']} within {self.bot_timeout:g}s"
                )
                return
            finally:
                self._tool_results.pop(call_id, None)
        self.history.append(
            {
                "role": "assistant",
                "content": said or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ],
            }
        )
        for call, result in zip(calls, results, strict=True):
            output = str(result.get("output", ""))
            self.print(f"  ← tool result {call['name']}: {output}")
            self.history.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        follow_id = secrets.token_hex(8)
        started = time.monotonic()
        reply, more_calls, ttft, first_at = await self._final(
            [self._system_message(), *self.history]
        )
        follow = TurnReport(len(self.report.turns) + 1, "tool", report.tool or "", requests=1)
        follow.ttft_ms = round(ttft * 1000, 1)
        follow.u2u_ms = round((first_at - started) * 1000, 1)
        self.report.turns.append(follow)
        spoken, interrupted = await self._replica_speaks(reply, follow_id)
        follow.reply, follow.interrupted = spoken, interrupted
        self.print(f"  {self.persona_display}: {spoken}   (ttft {follow.ttft_ms:.1f} ms)")
        if spoken:
            self.history.append({"role": "assistant", "content": spoken})
        if more_calls:
            self.report.errors.append("the follow-up asked for more tools; not simulated")

    # -- interactions from the room ---------------------------------------------------------

    async def _handle_room(self) -> None:
        while True:
            message = await self.inbox.queue.get()
            event_type = str(message.get("event_type", ""))
            props = message.get("properties") or {}
            if not isinstance(props, dict):
                props = {}
            try:
                await self._on_interaction(event_type, props)
            except Exception as exc:  # never stop listening
                log.warning("simulated replica failed on %s: %s", event_type, exc)
                self.report.errors.append(f"{event_type}: {exc}")

    async def _on_interaction(self, event_type: str, props: dict[str, Any]) -> None:
        if event_type == "conversation.interrupt":
            self._interrupt.set()
        elif event_type == "conversation.tool_result":
            future = self._tool_results.get(str(props.get("tool_call_id", "")))
            if future is not None and not future.done():
                future.set_result(props)
        elif event_type == "conversation.overwrite_llm_context":
            self.context = str(props.get("context", ""))
            self.print(f"  (context replaced: {self.context!r})")
        elif event_type == "conversation.append_llm_context":
            self.context = (self.context + " " + str(props.get("context", ""))).strip()
            self.print(f"  (context appended: {props.get('context')!r})")
        elif event_type == "conversation.echo" and props.get("modality", "text") == "text":
            text = str(props.get("text", ""))
            self._spawn(self._speak_echo(text))
        elif event_type == "conversation.respond":
            text = str(props.get("text", ""))
            self._spawn(self._locked_turn("respond", text))

    async def _speak_echo(self, text: str) -> None:
        async with self._speech:
            self.print(f"  {self.persona_display} (echo): {text}")
            said, _ = await self._replica_speaks(text, secrets.token_hex(8))
            if said:
                self.history.append({"role": "assistant", "content": said})
        async with self._echo_spoken:
            self._echoes_spoken.append(text)
            self._echo_spoken.notify_all()

    async def _locked_turn(self, kind: str, text: str, interrupt_after: int | None = None) -> None:
        import openai

        async with self._speech:
            try:
                await self._turn(kind, text, interrupt_after)
            except openai.APIError as exc:
                self.report.errors.append(f"{kind} turn failed: {exc}")

    # -- the server's API ---------------------------------------------------------------------

    async def interaction(self, body: dict[str, Any]) -> None:
        for _ in range(40):  # the bot may still be joining: 503 bot_starting is retryable
            resp = await self.http.post(
                f"/api/conversations/{self.conversation_id}/interactions", json=body
            )
            if resp.status_code == 200:
                return
            if resp.status_code not in (409, 503):
                break
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{body['type']}: HTTP {resp.status_code} {resp.text[:200]}")

    async def _callback(self, payload: dict[str, Any]) -> None:
        if not self.callback_token:
            self.report.errors.append("no callback token: callbacks not posted")
            return
        resp = await self.http.post(
            "/callbacks/tavus", params={"token": self.callback_token}, json=payload
        )
        kind = str(payload.get("event_type"))
        self.report.callbacks[kind] = resp.status_code
        if resp.status_code != 200:
            self.report.errors.append(f"callback {kind}: HTTP {resp.status_code}")

    def _envelope(self, event_type: str, properties: dict[str, Any]) -> dict[str, Any]:
        return {
            "properties": properties,
            "conversation_id": self.conversation_id,
            "webhook_url": f"{self.server_url}/callbacks/tavus",
            "event_type": event_type,
            "message_type": "application" if event_type.startswith("application.") else "system",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }

    async def _wait_for_bot(self) -> None:
        try:
            await asyncio.wait_for(self.inbox.bot_present.wait(), timeout=self.bot_timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the server's bot did not join the room within {self.bot_timeout:g}s"
            ) from None

    # -- the whole conversation -----------------------------------------------------------------

    async def run(self) -> SimulationReport:
        listener: asyncio.Task[None] | None = None
        try:
            await self.replica.join(self.room_url)
            await self.human.join(self.room_url)
            listener = asyncio.create_task(self._handle_room())
            resp = await self.http.post(
                "/api/conversations",
                json={
                    "persona": self.script.persona,
                    "conversation_id": self.conversation_id,
                    "conversation_url": self.room_url,
                },
            )
            if resp.status_code != 201:
                raise RuntimeError(
                    f"could not attach the bot: HTTP {resp.status_code} {resp.text[:300]}"
                )
            self.print(
                f"conversation {self.conversation_id}: persona {self.script.persona}, room {self.room_url}"
            )
            await self._wait_for_bot()
            self.print("  (the server's bot joined the room)")
            await self._callback(self._envelope("system.replica_joined", {"replica_id": "r-sim"}))
            for step in self.script.turns:
                await self._step(step)
                if step.pause:
                    await asyncio.sleep(step.pause)
            if self.linger:
                self.print(f"  (lingering {self.linger:g}s for interactions)")
                await asyncio.sleep(self.linger)
            async with self._speech:  # let a speech in progress finish
                pass
            await self._callback(
                self._envelope(
                    "system.shutdown",
                    {"replica_id": "r-sim", "shutdown_reason": "end_conversation_endpoint_hit"},
                )
            )
            transcript = [
                self._system_message(),
                *[{"role": t["role"], "content": t["content"]} for t in self.transcript],
            ]
            await self._callback(
                self._envelope(
                    "application.transcription_ready",
                    {"replica_id": "r-sim", "transcript": transcript},
                )
            )
        except Exception as exc:
            self.report.errors.append(f"{type(exc).__name__}: {exc}")
            log.warning("simulation %s failed: %s", self.conversation_id, exc)
        finally:
            for task in [*self._tasks, *([listener] if listener is not None else [])]:
                task.cancel()
            for room in (self.human, self.replica):
                with contextlib.suppress(Exception):
                    await room.leave()
            with contextlib.suppress(Exception):
                await self._collect_record()
            await self.http.aclose()
            await self.llm.close()
            self.report.duration_s = time.monotonic() - self._started
        return self.report

    async def _step(self, step: Step) -> None:
        if step.user is not None:
            await self._locked_turn("user", step.user, step.interrupt_after_words)
        elif step.respond is not None:
            self.print(f"  → respond via API: {step.respond}")
            before = len(self.report.turns)
            await self.interaction({"type": "respond", "text": step.respond})
            await self._wait(lambda: len(self.report.turns) > before and not self._speech.locked())
        elif step.echo is not None:
            self.print(f"  → echo via API: {step.echo}")
            await self.interaction({"type": "echo", "text": step.echo})
            async with self._echo_spoken:
                await asyncio.wait_for(
                    self._echo_spoken.wait_for(lambda: step.echo in self._echoes_spoken),
                    timeout=self.bot_timeout,
                )
        elif step.overwrite_context is not None:
            self.print("  → overwrite_context via API")
            await self.interaction({"type": "overwrite_context", "context": step.overwrite_context})
            await self._wait(lambda: self.context == step.overwrite_context)
        elif step.append_context is not None:
            self.print("  → append_context via API")
            await self.interaction({"type": "append_context", "context": step.append_context})
            await self._wait(lambda: (step.append_context or "") in self.context)

    async def _wait(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.bot_timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the interaction did not reach the simulated replica in time")
            await asyncio.sleep(0.02)
        async with self._speech:
            pass

    async def _collect_record(self) -> None:
        await asyncio.sleep(0.3)  # the bot's recorder batches writes
        resp = await self.http.get(f"/api/conversations/{self.conversation_id}")
        if resp.status_code != 200:
            return
        data = resp.json()
        events = data.get("events") or []
        by_source: dict[str, int] = {}
        for event in events:
            by_source[str(event.get("source"))] = by_source.get(str(event.get("source")), 0) + 1
        conversation = data.get("conversation") or {}
        self.report.recorded = {
            "status": conversation.get("status"),
            "events_by_source": by_source,
            "utterances": len(data.get("utterances") or []),
            "tool_calls": len(data.get("tool_calls") or []),
            "transcript_lines": len((data.get("transcript") or {}).get("entries") or []),
        }


def render_table(report: SimulationReport) -> str:
    rows = [("#", "kind", "requests", "ttft ms", "u2u ms", "interrupted", "tool", "text")]
    for t in report.turns:
        rows.append(
            (
                str(t.index),
                t.kind,
                str(t.requests),
                f"{t.ttft_ms:.1f}" if t.ttft_ms is not None else "-",
                f"{t.u2u_ms:.1f}" if t.u2u_ms is not None else "-",
                "yes" if t.interrupted else "",
                t.tool or "",
                (t.text[:40] + "…") if len(t.text) > 41 else t.text,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report.summary()
    lines.append("")
    lines.append(
        f"turns {s['turns']}, LLM requests {s['llm_requests']}, ttft p50 {s['ttft_ms_p50']} ms "
        f"(p95 {s['ttft_ms_p95']}), utterance-to-utterance p50 {s['u2u_ms_p50']} ms "
        f"(p95 {s['u2u_ms_p95']}), interruptions {s['interruptions']}, tool calls {s['tool_calls']}, "
        f"errors {s['errors']}"
    )
    if report.callbacks:
        lines.append("callbacks: " + ", ".join(f"{k} → {v}" for k, v in report.callbacks.items()))
    if report.recorded:
        r = report.recorded
        lines.append(
            f"recorded: status {r.get('status')}, events {r.get('events_by_source')}, "
            f"utterances {r.get('utterances')}, tool calls {r.get('tool_calls')}, "
            f"transcript lines {r.get('transcript_lines')}"
        )
    for error in report.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)


class RoomHost:
    """A LocalRoomServer started on first use and kept for the process (the server's simulations)."""

    def __init__(self) -> None:
        self.server: LocalRoomServer | None = None
        self._lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[SimulationReport]] = set()

    async def get(self) -> LocalRoomServer:
        async with self._lock:
            if self.server is None:
                self.server = await LocalRoomServer("127.0.0.1", 0).start()
            return self.server

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.close()
            self.server = None


# -- HTTP: the console's "start a simulated conversation" button ------------------------------

router = APIRouter(prefix="/api/simulations", tags=["simulations"])
MAX_SIMULATIONS = 5


class StartSimulation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str | None = Field(default=None, description="default: the script's persona")
    linger: float = Field(
        default=90.0, ge=0, le=600, description="seconds to stay for interactions"
    )
    words_per_second: float | None = Field(default=None, gt=0, le=1000)


async def _require_key(request: Request) -> None:
    # async: FastAPI runs sync dependencies in a thread pool (a thread hop per request)
    check_api_key(request.headers, get_runtime(request).settings.api_keys)


@router.post(
    "",
    status_code=202,
    dependencies=[Depends(_require_key)],
    summary="Start a simulated conversation",
)
async def start_simulation(request: Request) -> JSONResponse:
    runtime = get_runtime(request)
    raw = (
        await read_json_object(request, 64 * 1024)
        if request.headers.get("content-length") not in (None, "0")
        else {}
    )
    try:
        body = StartSimulation.model_validate(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise ApiError(400, message, "invalid_request", param) from None
    script = load_script()
    updates: dict[str, Any] = {}
    if body.persona is not None:
        updates["persona"] = body.persona
    if body.words_per_second is not None:
        updates["words_per_second"] = body.words_per_second
    script = script.model_copy(update=updates)
    persona = runtime.personas.get(script.persona)
    if persona is None:
        raise ApiError(404, f"No persona {script.persona!r}.", "persona_not_found", "persona")
    host: RoomHost = runtime.extras.setdefault("simulations", RoomHost())
    if len(host.tasks) >= MAX_SIMULATIONS:
        raise ApiError(
            429,
            f"{MAX_SIMULATIONS} simulations are already running.",
            "too_many_simulations",
            headers={"Retry-After": "30"},
        )
    rooms = await host.get()
    server = request.scope.get("server") or ("127.0.0.1", runtime.settings.port)
    bind = server[0] if server[0] not in ("0.0.0.0", "::", "") else "127.0.0.1"
    key = presented_key(request.headers) or ""
    tokens = runtime.settings.callback_tokens
    conversation_id = "sim-" + secrets.token_hex(5)
    simulation = Simulation(
        server_url=f"http://{bind}:{server[1]}",
        api_key=key,
        callback_token=tokens[0] if tokens else None,
        room_url=rooms.room_url(conversation_id),
        script=script,
        persona_name=persona.persona_name,
        system_prompt=" ".join(p for p in (persona.system_prompt, persona.context) if p),
        conversation_id=conversation_id,
        printer=lambda line: log.info("simulation %s: %s", conversation_id, line.strip()),
        linger=body.linger,
    )
    task = asyncio.create_task(simulation.run())
    host.tasks.add(task)
    task.add_done_callback(host.tasks.discard)
    return JSONResponse(
        {"conversation_id": conversation_id, "persona": script.persona, "linger": body.linger},
        status_code=202,
    )


# -- CLI: `cvi-agent simulate` ------------------------------------------------------------------


def add_simulate_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "simulate",
        help="an offline stand-in for Tavus: a simulated user and replica talk to the server",
        description="Plays a script (YAML) as Tavus would: progressive (speculative) requests, "
        "a replica speaking in a local room, tool calls answered by the bot, callbacks at the end.",
    )
    parser.add_argument(
        "--server", default=None, help="a running server's URL (default: start one here)"
    )
    parser.add_argument(
        "--key", default=None, help="API key (default: CVI_API_KEYS or var/dev-api-key)"
    )
    parser.add_argument(
        "--callback-token", default=None, help="default: CVI_CALLBACK_TOKEN or var/callback-token"
    )
    parser.add_argument(
        "--script", type=Path, default=None, help=f"default: {DEFAULT_SCRIPT.name} (shipped)"
    )
    parser.add_argument("--persona", default=None, help="override the script's persona")
    parser.add_argument("--words-per-second", type=float, default=None, help="speaking speed")
    parser.add_argument(
        "--linger", type=float, default=0.0, help="seconds to stay for interactions"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=cmd_simulate)


def cmd_simulate(args: Any) -> int:
    from cvi_agent.config import Settings, ensure_dev_callback_token, ensure_dev_key

    try:
        script = load_script(args.script)
    except ValueError as exc:
        print(f"cvi-agent simulate: {exc}", file=sys.stderr)
        return 2
    updates: dict[str, Any] = {}
    if args.persona:
        updates["persona"] = args.persona
    if args.words_per_second:
        updates["words_per_second"] = args.words_per_second
    script = script.model_copy(update=updates)
    settings = Settings()
    if args.server is None:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if ensure_dev_key(settings):
            ensure_dev_callback_token(settings)
    key = args.key or (
        settings.api_keys[0] if settings.api_keys else _read(settings.var_dir / "dev-api-key")
    )
    token = args.callback_token or (
        settings.callback_tokens[0]
        if settings.callback_tokens
        else _read(settings.var_dir / "callback-token")
    )
    if not key:
        print("cvi-agent simulate: no API key: pass --key or set CVI_API_KEYS", file=sys.stderr)
        return 2
    try:
        from cvi_agent.app import load_checked_personas

        personas = load_checked_personas(settings)
    except Exception as exc:
        print(f"cvi-agent simulate: cannot load personas: {exc}", file=sys.stderr)
        return 2
    persona = personas.get(script.persona)
    if persona is None:
        print(
            f"cvi-agent simulate: no persona {script.persona!r} in {settings.personas_dir}",
            file=sys.stderr,
        )
        return 2

    printer: Printer = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    server = None
    server_url = args.server
    if server_url is None:
        from cvi_agent.app import create_app
        from cvi_agent.devtools.fakes.server import LoopbackServer

        server = LoopbackServer(create_app(settings, personas)).start()
        server_url = server.url
        printer(f"started a server on {server_url} (database {settings.database_url})")

    async def main() -> SimulationReport:
        async with LocalRoomServer("127.0.0.1", 0) as rooms:
            conversation_id = "sim-" + secrets.token_hex(5)
            simulation = Simulation(
                server_url=server_url,
                api_key=key,
                callback_token=token or None,
                room_url=rooms.room_url(conversation_id),
                script=script,
                persona_name=persona.persona_name,
                system_prompt=" ".join(p for p in (persona.system_prompt, persona.context) if p),
                conversation_id=conversation_id,
                printer=printer,
                linger=args.linger,
            )
            return await simulation.run()

    try:
        report = asyncio.run(main())
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print()
        print(render_table(report))
    return 1 if report.errors else 0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
