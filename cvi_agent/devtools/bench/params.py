"""What a bench run is told to do, and the requests it sends (Tavus-like: the system prompt of
a real persona, a client tool)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BENCH_KEY = "bench-key-0123456789"
PERSONA = "bench"  # with a client tool: the overhead scenario relays tool calls too
SPEECH_PERSONA = "bench-speech"  # no tools: the speculative scenario compares spoken tokens
SYSTEM_PROMPT = (
    "You are in a live video conference call with a user. Reply in short sentences, talk to the "
    "user in a casual way. Respond only in english. You are a storyteller. You like telling "
    "stories to people of all ages. Reply in brief utterances, and ask prompting questions to "
    "the user as you tell your stories to keep them engaged. Here are some of your favorite "
    "stories: Little Red Riding Hood, The Ugly Duckling and The Three Little Pigs. You are "
    "talking to Maya, who is from Dallas, Texas. She likes a good mystery book, and her "
    "favorite author is Agatha Christie."
)
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
UTTERANCE = "please tell me a short story about a brave little fox who lives deep in the forest"


@dataclass
class BenchParams:
    """Every setting of a run (`cvi-agent bench --help` describes them); the report repeats
    them so a table can be read without the command line that made it."""

    scenarios: tuple[str, ...] = ("overhead", "speculative")
    concurrency: int = 100
    rounds: int = 2
    phase_seconds: float = 6.0
    warmup_seconds: float = 1.5
    workers: int = 1
    upstream_ttft: float = 0.3
    tokens_per_second: float = 50.0
    reply_words: int = 40
    tool_call_share: float = 0.1
    conversations: int = 40
    spec_concurrency: int = 10
    partials: int = 4
    partial_gap: float = 0.2
    end_of_turn: float = 0.45
    abandon_share: float = 0.2
    request_timeout: float = 30.0
    seed: int = 11
    server_src: str | None = None  # run the server from another source tree (before/after)
    web_processes: int = 2  # scaleout: web processes behind the round-robin relay
    redis_url: str = "redis://127.0.0.1:6379/0"  # scaleout, overhead_redis: turns shared here
    overhead_redis: bool = False  # overhead: also the same server with CVI_REDIS_URL set
    # Partial gaps vary by ± this share (scaleout): with equal gaps, conversations in flight
    # settle into a fixed order, and a round-robin balancer then sends each conversation's
    # requests to the same process every time, which no real traffic does.
    gap_jitter: float = 0.0
