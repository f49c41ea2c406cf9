"""`Simulation`: a simulated user and replica in a `LocalRoom`, against the real server (its LLM
endpoint, its bot, its callback endpoint), playing Tavus's part of a conversation.

What it does, per user turn of the script:

1. The user "speaks": progressive partial transcripts go to `/v1/chat/completions` as Tavus's
   speculative inference sends them (each a longer prefix, each abandoned after its first chunk),
   then the final request, whose reply is spoken.
2. The replica "speaks" the reply in the room: `utterance` (intended text), progressive
   `utterance.streaming` and a final one (with `is_interrupted`), started/stopped speaking with
   durations from the word count. A client tool call is broadcast as `conversation.tool_call`;
   the bot's `conversation.tool_result` comes back and the reply continues with it.
3. Interactions are honoured, whichever way the server delivers them: through its bot in the room
   (Daily's app-message path), or through Tavus's send-app-message REST API, for which the
   simulator runs a stand-in on loopback (the fake Tavus API) that hands each message straight to
   the replica, as Tavus does, without broadcasting it into the room. Echo is spoken, interrupt
   cuts the reply short, respond starts a turn, overwrite/append context change the next
   request's system message. Each interaction's latency is measured per path: until the API
   answered, and until the replica had it.

The server's bot joins the same room (attached through `POST /api/conversations`) and records
everything; at the end the simulator posts `system.shutdown` and `application.transcription_ready`
to the callback endpoint, so the conversation reads like a real one in the API and the console.

`openai` is imported where it is used, not at the top: it is heavy (about 0.3 s to import) and
the server imports this module through `/api/simulations`; only a simulation should pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import httpx

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.devtools.simulate.report import InteractionReport, SimulationReport, TurnReport
from cvi_agent.devtools.simulate.script import Script, Step
from cvi_agent.protocol.interactions import InteractionRequest
from cvi_agent.rooms.base import Participant, RoomListener
from cvi_agent.rooms.local import LocalRoom

log = logging.getLogger(__name__)

Printer = Callable[[str], None]
"""Where progress lines go: the terminal for the CLI, the log for the server, a list in tests."""

Notify = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Told of milestones as they happen, `(kind, payload)`: `simulation.turn` when a reply has been
spoken (what the caller experienced: its TTFT at the simulated Tavus and utterance-to-utterance),
`simulation.script_finished` when the script is done and only the closing callbacks remain. The
server's `/api/simulations` stores them as the conversation's events, for the console."""


def _interaction_key(message: dict[str, Any]) -> str:
    """What tells one interaction from another (an arrival is matched with its request)."""
    return json.dumps(
        [message.get("event_type"), message.get("properties")], sort_keys=True, default=str
    )


_FIRST_EVENT_MAX = 64 * 1024


async def _first_event(response: Any) -> bytes:
    """Read a streamed response up to the end of its first server-sent event (or of its body,
    if shorter, or 64 KiB) and close the body's generator: nothing is left suspended for the
    garbage collector. Returns the event's lines."""
    received = b""
    async with contextlib.aclosing(response.aiter_raw()) as body:
        async for data in body:
            received += data
            if b"\n\n" in received.replace(b"\r\n", b"\n") or len(received) > _FIRST_EVENT_MAX:
                break
    return received.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def _event_error(event: bytes) -> str | None:
    """The message of an `error` event (how an OpenAI-compatible stream fails once started),
    or None for any other event."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        with contextlib.suppress(ValueError):
            data = json.loads(line[5:])
            if isinstance(data, dict) and data.get("error"):
                error = data["error"]
                message = error.get("message") if isinstance(error, dict) else None
                return str(message or "An error occurred during streaming")
    return None


class _ReplicaInbox(RoomListener):
    """Everything that reaches the simulated replica lands in one queue: the bot's interactions
    from the room, and Tavus's REST deliveries from the stand-in (`receive`).

    The room calls back synchronously; queueing keeps the handling (which awaits) in one task
    that handles interactions in the order they arrived. Arrival is stamped for whoever waits
    for an interaction (`expect`), at once, so its latency is not the handler's.
    """

    def __init__(self, simulated_ids: tuple[str, ...]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.bot_present = asyncio.Event()
        self.simulated_ids = simulated_ids
        self._expected: dict[str, deque[asyncio.Future[float]]] = {}

    def expect(self, message: dict[str, Any]) -> asyncio.Future[float]:
        """A future resolved with the monotonic time `message` reaches the replica."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._expected.setdefault(_interaction_key(message), deque()).append(future)
        return future

    def receive(self, message: Any) -> None:
        """Queue a conversation message (an interaction); ignore anything else."""
        if isinstance(message, str):
            with contextlib.suppress(ValueError):
                message = json.loads(message)
        if not isinstance(message, dict) or message.get("message_type") != "conversation":
            return
        waiting = self._expected.get(_interaction_key(message))
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(time.monotonic())
                break
        self.queue.put_nowait(message)

    def on_app_message(self, message: Any, sender: str | None) -> None:
        """An interaction the bot sent into the room."""
        self.receive(message)

    def on_participant_joined(self, participant: Participant) -> None:
        """Note the server's bot arriving: the script waits for it before the first turn."""
        if participant.user_id not in self.simulated_ids:
            self.bot_present.set()


class Simulation:
    """One simulated conversation against a running server.

    It plays Tavus's side (the replica in the room, the LLM requests, the callbacks) so that
    everything on the server's side runs for real and can be watched and measured offline.
    """

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
        rest: bool = True,
        tools: list[dict[str, Any]] | None = None,
        notify: Notify | None = None,
    ) -> None:
        """Prepare the two room peers and the HTTP clients; nothing connects until `run`.

        Args:
            server_url: the server under test (its LLM endpoint, API and callback endpoint).
            api_key: a key the server accepts, for the LLM requests and the API calls.
            callback_token: the server's callback token; without one the callbacks are not
                posted and the report says so.
            room_url: the `LocalRoom` the replica, the user and the server's bot meet in.
            script: the conversation to play.
            persona_name: the replica's display name in the room and in progress lines.
            system_prompt: the persona's prompt, sent in the system message as Tavus does.
            conversation_id: the id to attach the bot with; default: a fresh `sim-…` id.
            printer: where progress lines go; default: nowhere.
            linger: seconds to stay in the room after the script, for interactions sent
                by hand (from the console or the API).
            bot_timeout: how long to wait for the bot to join, for a tool result, or for
                an interaction to reach the replica, before reporting an error.
            rest: run a stand-in for Tavus's send-app-message on loopback and attach it, so
                the server can deliver interactions over REST to the replica; only when the
                server runs on this machine (else `via: rest` steps go through the bot).
            tools: the tools every LLM request declares, as Tavus sends the persona's
                `layers.llm.tools` (its client tools); without them none is callable.
            notify: told of milestones (`Notify`); its failures are logged, never raised.
        """
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.callback_token = callback_token
        self.room_url = room_url
        self.script = script
        self.persona_display = persona_name
        self.conversation_id = conversation_id or "sim-" + secrets.token_hex(5)
        self.print = printer or (lambda line: None)
        self.linger = linger
        self.notify = notify
        self.bot_timeout = bot_timeout
        self.request_tools: dict[str, Any] = {"tools": tools} if tools else {}
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
        self.rest = rest
        self.standin = FakeTavus(api_key=None, on_app_message=self._from_rest)
        self._standin_server: LoopbackServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrivals: set[asyncio.Task[None]] = set()
        self.http = httpx.AsyncClient(
            base_url=self.server_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=15
        )
        import openai  # heavy: see the module's docstring

        self.llm = openai.AsyncOpenAI(
            base_url=self.server_url + "/v1",
            api_key=api_key,
            max_retries=0,
            default_headers={"x-conversation-id": self.conversation_id},
        )

    def _from_rest(self, conversation_id: str, message: dict[str, Any]) -> None:
        """The stand-in delivered a REST interaction (on its own thread): to the replica."""
        if self._loop is not None and conversation_id == self.conversation_id:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the simulation ended
                self._loop.call_soon_threadsafe(self.inbox.receive, message)

    async def _start_standin(self) -> str:
        # Inside a server (the console's button), leave the process's logging as it is:
        # uvicorn applies its own logging configuration unless told not to.
        server = LoopbackServer(self.standin.app, log_config=None, log_level=None)
        await asyncio.to_thread(server.start)
        self._standin_server = server
        self.standin.url = server.url
        self.standin.add_conversation(self.conversation_id)
        return server.url

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
        """A request that is abandoned after its first chunk, as a speculative one is.

        The same request as the final one (through the same client, `tools` and all), but its
        body is read raw, up to the end of the first event, and closed here. The SDK's stream,
        left after one chunk, stays suspended in a reference cycle (the stream and its own
        generator): only a garbage collection closes it, on whichever thread it runs, and when
        the server runs in this process (`cvi-agent simulate`) that was its thread, racing this
        loop over the same generators (`Exception ignored in: <async_generator …>` on stderr).
        """
        import openai  # heavy: see the module's docstring

        try:
            async with self.llm.chat.completions.with_streaming_response.create(
                model=self.script.persona,
                stream=True,
                messages=cast(Any, messages),
                **self.request_tools,
            ) as response:
                first = await _first_event(response.http_response)
        except openai.APIError as exc:
            self.report.errors.append(f"speculative request failed: {exc}")
            return
        except Exception as exc:  # the body broke off: the SDK's stream said the same
            self.report.errors.append(f"speculative request failed: {type(exc).__name__}: {exc}")
            return
        error = _event_error(first)
        if error is not None:
            self.report.errors.append(f"speculative request failed: {error}")

    async def _final(
        self, messages: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, str]], float, float, str | None]:
        """The request whose reply is spoken: (text, client tool calls, ttft s, first-token time,
        the response's `chatcmpl-…` id, which names its `llm.turn` record)."""
        started = time.monotonic()
        first: float | None = None
        completion_id: str | None = None
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        stream = await self.llm.chat.completions.create(
            model=self.script.persona,
            stream=True,
            messages=cast(Any, messages),
            **self.request_tools,
        )
        async with stream:
            async for chunk in stream:
                completion_id = completion_id or chunk.id
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
        return (
            "".join(text),
            [calls[i] for i in sorted(calls)],
            first - started,
            first,
            completion_id,
        )

    async def _turn(
        self,
        kind: str,
        text: str,
        interrupt_after: int | None = None,
        interrupt_via: str | None = None,
    ) -> None:
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
        reply, calls, ttft, first_at, report.completion_id = await self._final(
            [self._system_message(), *self.history]
        )
        report.requests += 1
        report.ttft_ms = round(ttft * 1000, 1)
        # The replica starts speaking with the first token (TTS streams): stopped → first token.
        report.u2u_ms = round((first_at - stopped) * 1000, 1)
        if interrupt_after is not None:
            self._spawn(self._interrupt_via_api(interrupt_after, interrupt_via))
        said, interrupted = await self._replica_speaks(reply, inference_id, interrupt_after)
        report.reply, report.interrupted = said, interrupted
        line = f"  {self.persona_display}: {said}" + (" [interrupted]" if interrupted else "")
        self.print(line + f"   (ttft {report.ttft_ms:.1f} ms, {report.requests} requests)")
        await self._notify("simulation.turn", report.as_dict())
        if calls:
            await self._tool_round(report, reply, calls, inference_id)
        elif said:
            self.history.append({"role": "assistant", "content": said})

    async def _interrupt_via_api(self, after_words: int, via: str | None) -> None:
        # Wait until the replica has said `after_words` words, then interrupt through the API.
        await asyncio.sleep(after_words * self._word_delay())
        try:
            await self.interaction({"type": "interrupt"}, via)
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
        reply, more_calls, ttft, first_at, completion_id = await self._final(
            [self._system_message(), *self.history]
        )
        follow = TurnReport(len(self.report.turns) + 1, "tool", report.tool or "", requests=1)
        follow.completion_id = completion_id
        follow.ttft_ms = round(ttft * 1000, 1)
        follow.u2u_ms = round((first_at - started) * 1000, 1)
        self.report.turns.append(follow)
        spoken, interrupted = await self._replica_speaks(reply, follow_id)
        follow.reply, follow.interrupted = spoken, interrupted
        self.print(f"  {self.persona_display}: {spoken}   (ttft {follow.ttft_ms:.1f} ms)")
        await self._notify("simulation.turn", follow.as_dict())
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

    async def _locked_turn(
        self,
        kind: str,
        text: str,
        interrupt_after: int | None = None,
        interrupt_via: str | None = None,
    ) -> None:
        import openai  # heavy: see the module's docstring

        async with self._speech:
            try:
                await self._turn(kind, text, interrupt_after, interrupt_via)
            except openai.APIError as exc:
                self.report.errors.append(f"{kind} turn failed: {exc}")

    # -- the server's API ---------------------------------------------------------------------

    async def interaction(self, body: dict[str, Any], via: str | None = None) -> None:
        """Send an interaction through the server's API, as a developer would.

        It reaches the replica through the path `via` asks for (the bot and the room, or
        Tavus's REST API, here the stand-in), so a script step tests that whole path; a bot
        still joining (409/503) is waited for, briefly. Each is reported with its path and
        latency; the wait for its arrival at the replica goes on in the background.
        """
        asked = via or "auto"
        if asked == "rest" and self._standin_server is None:
            self.print("  (no stand-in for Tavus's API here: sending through the bot)")
            asked = "bot"
        url = f"/api/conversations/{self.conversation_id}/interactions"
        # Over REST it reaches the replica before the API answers: expect it before sending.
        expected = InteractionRequest.parse(body).to_message(self.conversation_id)
        arrival = self.inbox.expect(expected)
        for _ in range(40):  # the bot may still be joining: 503 bot_starting is retryable
            started = time.monotonic()
            resp = await self.http.post(url, json=body, params={"via": asked})
            api_ms = round((time.monotonic() - started) * 1000, 1)
            if resp.status_code in (200, 202):
                entry = InteractionReport(
                    str(body.get("type")), asked, resp.json().get("via"), resp.status_code, api_ms
                )
                self.report.interactions.append(entry)
                self._track(entry, arrival, started)
                return
            if resp.status_code not in (409, 503):
                break
            await asyncio.sleep(0.25)
        arrival.cancel()
        self.report.interactions.append(
            InteractionReport(str(body.get("type")), asked, None, resp.status_code, api_ms)
        )
        raise RuntimeError(f"{body['type']}: HTTP {resp.status_code} {resp.text[:200]}")

    def _track(
        self, entry: InteractionReport, arrival: asyncio.Future[float], started: float
    ) -> None:
        """Fill in when the interaction reached the replica, once it does."""

        async def arrived() -> None:
            try:
                at = await asyncio.wait_for(arrival, self.bot_timeout)
            except TimeoutError:
                self.report.errors.append(f"{entry.kind} via {entry.via} never reached the replica")
                return
            entry.replica_ms = round(max(0.0, at - started) * 1000, 1)

        task = asyncio.create_task(arrived())
        self._arrivals.add(task)
        task.add_done_callback(self._arrivals.discard)

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
        """Play the whole script, post the closing callbacks, and return what was observed.

        It never raises for a failed conversation: errors go into the report, and the rooms
        and clients are closed whatever happens.
        """
        listener: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        try:
            attach: dict[str, Any] = {
                "persona": self.script.persona,
                "conversation_id": self.conversation_id,
                "conversation_url": self.room_url,
            }
            if self.rest:
                attach["interactions_url"] = await self._start_standin()
            await self.replica.join(self.room_url)
            await self.human.join(self.room_url)
            listener = asyncio.create_task(self._handle_room())
            resp = await self.http.post("/api/conversations", json=attach)
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
            async with self._speech:  # let a speech in progress finish
                pass
            await self._notify(
                "simulation.script_finished",
                {"turns": len(self.report.turns), "callbacks_in_s": self.linger},
            )
            if self.linger:
                self.print(f"  (lingering {self.linger:g}s for interactions)")
                await asyncio.sleep(self.linger)
            async with self._speech:  # an interaction sent meanwhile may still be speaking
                pass
            if self._arrivals:  # every interaction sent has arrived, or timed out
                await asyncio.gather(*self._arrivals, return_exceptions=True)
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
            for task in [
                *self._tasks,
                *self._arrivals,
                *([listener] if listener is not None else []),
            ]:
                task.cancel()
            for room in (self.human, self.replica):
                with contextlib.suppress(Exception):
                    await room.leave()
            with contextlib.suppress(Exception):
                await self._collect_record()
            await self.http.aclose()
            await self.llm.close()
            if self._standin_server is not None:
                await asyncio.to_thread(self._standin_server.stop)
                self._standin_server = None
            self.report.duration_s = time.monotonic() - self._started
        return self.report

    async def _notify(self, kind: str, payload: dict[str, Any]) -> None:
        if self.notify is None:
            return
        try:
            await self.notify(kind, payload)
        except Exception as exc:  # a milestone the console misses must not stop the script
            log.warning("simulation %s: could not report %s: %s", self.conversation_id, kind, exc)

    async def _step(self, step: Step) -> None:
        path = f" ({step.via})" if step.via else ""
        if step.user is not None:
            await self._locked_turn("user", step.user, step.interrupt_after_words, step.via)
        elif step.respond is not None:
            self.print(f"  → respond via API{path}: {step.respond}")
            before = len(self.report.turns)
            await self.interaction({"type": "respond", "text": step.respond}, step.via)
            await self._wait(lambda: len(self.report.turns) > before and not self._speech.locked())
        elif step.echo is not None:
            self.print(f"  → echo via API{path}: {step.echo}")
            await self.interaction({"type": "echo", "text": step.echo}, step.via)
            async with self._echo_spoken:
                await asyncio.wait_for(
                    self._echo_spoken.wait_for(lambda: step.echo in self._echoes_spoken),
                    timeout=self.bot_timeout,
                )
        elif step.overwrite_context is not None:
            self.print(f"  → overwrite_context via API{path}")
            body = {"type": "overwrite_context", "context": step.overwrite_context}
            await self.interaction(body, step.via)
            await self._wait(lambda: self.context == step.overwrite_context)
        elif step.append_context is not None:
            self.print(f"  → append_context via API{path}")
            await self.interaction(
                {"type": "append_context", "context": step.append_context}, step.via
            )
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
        self._note_fallbacks(events)
        conversation = data.get("conversation") or {}
        self.report.recorded = {
            "status": conversation.get("status"),
            "events_by_source": by_source,
            "utterances": len(data.get("utterances") or []),
            "tool_calls": len(data.get("tool_calls") or []),
            "transcript_lines": len((data.get("transcript") or {}).get("entries") or []),
        }

    def _note_fallbacks(self, events: list[dict[str, Any]]) -> None:
        """Every spoken turn the server answered with its fallback line (or an error) is an
        error of the run, with its cause, and marks the turn; speculative requests that fell
        back make one more error line between them (their cause is the same in practice)."""
        by_completion = {t.completion_id: t for t in self.report.turns if t.completion_id}
        speculative: list[str] = []
        for event in events:
            payload = event.get("payload") or {}
            if event.get("kind") != "llm.turn" or not payload.get("fallback"):
                continue
            cause = str(payload.get("error") or payload.get("fallback_reason") or "unknown cause")
            turn = by_completion.get(str(payload.get("completion_id")))
            if turn is None:
                speculative.append(cause)
                continue
            turn.fallback = cause
            said = str(payload.get("user_text") or "")
            self.report.errors.append(
                f"turn {turn.index} fell back ({payload.get('fallback_reason')}) "
                f"after {said[:40]!r}: {cause}"
            )
        if speculative:
            self.report.errors.append(
                f"{len(speculative)} speculative request(s) fell back too; the last: "
                f"{speculative[-1]}"
            )
