"""The flow brain: deterministic replies defined entirely in the persona YAML.

State comes from the conversation history itself (which questions the assistant already asked
and what the user answered next), so the brain is pure: a speculative request computes the
same answers as the final one, and several server processes agree without shared memory.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

from cvi_agent.llm.brains.base import (
    BrainEvent,
    Finish,
    TextDelta,
    ToolCallDelta,
    TurnContext,
    estimate_prompt_tokens,
    estimate_tokens,
)
from cvi_agent.llm.brains.speech import clean_user_text, normalize, render, speak
from cvi_agent.personas import FlowConfig, Intent, Persona, Questionnaire
from cvi_agent.protocol.chat import ChatMessage


def questionnaire_state(
    questionnaire: Questionnaire, messages: list[ChatMessage]
) -> tuple[dict[str, str], list[str]]:
    """(answers so far, ids of questions already asked), read from the history."""
    asked: dict[str, int] = {}
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        said = normalize(message.text())
        for question in questionnaire.questions:
            if question.id not in asked and normalize(question.ask) in said:
                asked[question.id] = i
    answers: dict[str, str] = {}
    for qid, at in asked.items():
        for message in messages[at + 1 :]:
            if message.role == "assistant":
                break
            if message.role == "user":
                text = clean_user_text(message.text())
                if text:
                    answers[qid] = text
                    break
    order = [q.id for q in questionnaire.questions if q.id in asked]
    return answers, order


class FlowBrain:
    """Replies scripted in the persona's `flow`: intents (regex → reply, optionally a tool
    call), then the questionnaire, then the greeting or the fallback line.

    Holds nothing per conversation (see the module doc), so speculative, replayed and final
    requests of one turn get the same answer. Tools follow the turn's `ToolRunner`: an intent's
    tool declared by the request is streamed back as a `tool_calls` reply (its result, arriving
    in the next request, is spoken by `after_tool`); a persona server tool the request does not
    shadow runs here (its side-effect rule included); a tool the turn may not call (a client
    tool the request does not declare, or `tool_choice: none`) is not called: the intent's
    `without_tool` line is spoken instead, else the flow's fallback. `tool_choice` `required`
    or a named function makes a call whatever was said (`_forced`).
    """

    def __init__(self, persona: Persona) -> None:
        """Compile the intents' patterns once; `persona` must have a `flow` section."""
        assert persona.flow is not None
        self.persona = persona
        self.flow: FlowConfig = persona.flow
        self._compiled: list[tuple[Intent, list[re.Pattern[str]]]] = [
            (intent, [re.compile(p, re.I) for p in intent.patterns]) for intent in self.flow.intents
        ]

    async def aclose(self) -> None:
        """Nothing to release."""
        return None

    def _variables(
        self, ctx: TurnContext, user_text: str, answers: dict[str, str]
    ) -> dict[str, Any]:
        variables: dict[str, Any] = {
            "persona_name": self.persona.persona_name,
            "conversation_id": ctx.conversation_id or "",
            "user_text": user_text,
            "answers": answers,
        }
        variables.update(answers)
        return variables

    def _match(self, text: str) -> tuple[Intent, dict[str, str]] | None:
        for intent, patterns in self._compiled:
            for pattern in patterns:
                match = pattern.search(text)
                if match:
                    groups = {k: v.strip() for k, v in match.groupdict().items() if v}
                    return intent, groups
        return None

    def _intent_for_tool(self, name: str) -> Intent | None:
        for intent in self.flow.intents:
            if intent.tool is not None and intent.tool.name == name:
                return intent
        return None

    def _plan_questionnaire(self, ctx: TurnContext, user_text: str) -> str | None:
        q = self.flow.questionnaire
        if q is None:
            return None
        messages = ctx.request.messages
        answers, asked = questionnaire_state(q, messages)
        ctx.state["answers"] = answers
        remaining = [question for question in q.questions if question.id not in asked]
        if not asked:
            lead = " ".join(p for p in (self.flow.greeting or "", q.intro) if p)
            return render(
                " ".join(p for p in (lead, remaining[0].ask) if p),
                self._variables(ctx, user_text, answers),
            )
        last_asked = asked[-1]
        if last_asked not in answers and not remaining:
            return None
        ack = (
            q.acknowledgements[len(answers) % len(q.acknowledgements)] if q.acknowledgements else ""
        )
        if remaining:
            text = " ".join(p for p in (ack, remaining[0].ask) if p)
        else:
            outro = normalize(render(q.outro, self._variables(ctx, user_text, answers)))
            already_closed = any(
                m.role == "assistant" and outro in normalize(m.text()) for m in messages
            )
            if already_closed:
                return None
            text = " ".join(p for p in (ack, q.outro) if p)
        return render(text, self._variables(ctx, user_text, answers))

    async def _say(self, text: str) -> AsyncIterator[TextDelta]:
        cfg = self.persona.brain
        async for delta in speak(text, cfg.words_per_chunk, cfg.chunk_delay_ms):
            yield delta

    async def stream(self, ctx: TurnContext) -> AsyncIterator[BrainEvent]:
        """One reply, decided from the history alone. A questionnaire step also leaves the
        answers so far in `ctx.state["answers"]`, which the turn recorder stores."""
        messages = ctx.request.messages
        last = messages[-1]
        answers: dict[str, str] = {}
        if self.flow.questionnaire is not None:
            answers, _ = questionnaire_state(self.flow.questionnaire, messages)
        prompt_tokens = estimate_prompt_tokens(ctx)

        if ctx.tools.choice.mode in ("required", "function"):
            async for event in self._forced(ctx, answers, prompt_tokens):
                yield event
            return

        # A client tool's result came back in the history: speak the intent's follow-up.
        if last.role == "tool":
            name = self._tool_name_for(messages, last.tool_call_id)
            intent = self._intent_for_tool(name) if name else None
            variables = self._variables(ctx, "", answers)
            variables["result"] = _parse_result(last.text())
            text = render(intent.after_tool or "{result}", variables) if intent else last.text()
            async for delta in self._say(text):
                yield delta
            yield Finish("stop", prompt_tokens, estimate_tokens(text))
            return

        user_text = clean_user_text(ctx.request.last_user_text())
        matched = self._match(user_text) if user_text else None
        if matched is not None:
            intent, groups = matched
            variables = self._variables(ctx, user_text, answers)
            variables.update(groups)
            tool = intent.tool.name if intent.tool is not None else None
            if tool is not None and not ctx.tools.may_call(tool):
                text = render(intent.without_tool or self.flow.fallback, variables)
                async for delta in self._say(text):
                    yield delta
                yield Finish("stop", prompt_tokens, estimate_tokens(text))
                return
            async for event in self._run_intent(ctx, intent, variables, tool, prompt_tokens):
                yield event
            return

        planned = self._plan_questionnaire(ctx, user_text)
        if planned is not None:
            text = planned
        else:
            if not any(m.role == "assistant" for m in messages) and self.flow.greeting:
                text = render(self.flow.greeting, self._variables(ctx, user_text, answers))
            else:
                text = render(self.flow.fallback, self._variables(ctx, user_text, answers))
        async for delta in self._say(text):
            yield delta
        yield Finish("stop", prompt_tokens, estimate_tokens(text))

    async def _forced(
        self, ctx: TurnContext, answers: dict[str, str], prompt_tokens: int
    ) -> AsyncIterator[BrainEvent]:
        """`tool_choice` `required` or a named function: a call whatever was said. The tool
        is the named one, or (required) the matched intent's when callable, else the first
        intent's that is, else the first callable tool. Its arguments are those of an intent
        bound to it, rendered with what the user said (a named group its patterns do not
        match renders empty); a tool no intent names is called with `{}`."""
        tools = ctx.tools
        user_text = clean_user_text(ctx.request.last_user_text())
        variables = self._variables(ctx, user_text, answers)
        matched = self._match(user_text) if user_text else None
        name = tools.choice.name
        if name is None:  # required
            candidates = [matched[0]] if matched is not None else []
            candidates += self.flow.intents
            for candidate in candidates:
                if candidate.tool is not None and tools.may_call(candidate.tool.name):
                    name = candidate.tool.name
                    break
            else:
                name = tools.callable_names()[0]  # the route refuses `required` without tools
        intent: Intent | None
        if matched is not None and matched[0].tool is not None and matched[0].tool.name == name:
            intent = matched[0]
            variables.update(matched[1])
        else:
            intent = self._intent_for_tool(name)
            if intent is not None:
                variables.update(self._groups(intent, user_text))
        async for event in self._run_intent(
            ctx, intent, variables, name, prompt_tokens, say_reply=intent is not None
        ):
            yield event

    def _groups(self, intent: Intent, text: str) -> dict[str, str]:
        for compiled_intent, patterns in self._compiled:
            if compiled_intent is intent:
                for pattern in patterns:
                    match = pattern.search(text)
                    if match:
                        return {k: v.strip() for k, v in match.groupdict().items() if v}
        return {}

    async def _run_intent(
        self,
        ctx: TurnContext,
        intent: Intent | None,
        variables: dict[str, Any],
        tool: str | None,
        prompt_tokens: int,
        say_reply: bool = True,
    ) -> AsyncIterator[BrainEvent]:
        """The intent's reply and, when `tool` is given (a tool this turn may call), the call:
        run here for a server tool, streamed back for the caller's."""
        reply = render(intent.reply, variables) if intent and intent.reply and say_reply else ""
        if tool is None:
            async for delta in self._say(reply or self.flow.fallback):
                yield delta
            yield Finish("stop", prompt_tokens, estimate_tokens(reply))
            return
        spec = intent.tool if intent is not None and intent.tool is not None else None
        arguments = {
            k: render(v, variables) if isinstance(v, str) else v
            for k, v in (spec.arguments.items() if spec is not None else ())
        }
        arguments_json = json.dumps(arguments, ensure_ascii=False)
        call_id = "call_" + secrets.token_hex(8)
        if ctx.tools.is_server(tool):
            result = await ctx.tools.run(
                tool,
                arguments_json,
                call_id,
                ctx.conversation_id,
                side_effects_allowed=ctx.side_effects_allowed,
            )
            variables["result"] = _parse_result(result.output)
            after = intent.after_tool if intent is not None else None
            text = render(after or "{result}", variables)
            if reply:
                text = reply + " " + text
            async for delta in self._say(text):
                yield delta
            yield Finish("stop", prompt_tokens, estimate_tokens(text))
            return
        if reply:
            async for delta in self._say(reply):
                yield delta
        yield ToolCallDelta(0, call_id, tool, "")
        yield ToolCallDelta(0, None, None, arguments_json)
        yield Finish(
            "tool_calls", prompt_tokens, estimate_tokens(reply) + estimate_tokens(arguments_json)
        )

    @staticmethod
    def _tool_name_for(messages: list[ChatMessage], call_id: str | None) -> str | None:
        for message in reversed(messages):
            for call in message.tool_calls or []:
                if call_id is None or call.id == call_id:
                    return call.function.name
        return None


def _parse_result(output: str) -> Any:
    try:
        value = json.loads(output)
    except (json.JSONDecodeError, TypeError):
        return output
    return value if isinstance(value, dict) else output
