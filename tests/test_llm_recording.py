"""The turn recorder (llm/recording.py): turns that end close together share a transaction."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cvi_agent.llm.recording import TurnRecorder, TurnSample
from cvi_agent.store.sql import open_store


def _sample(n: int) -> TurnSample:
    return TurnSample(
        conversation_id=f"c-{n % 3}",
        completion_id=f"chatcmpl-{n}",
        persona="echo",
        stream=True,
        started_at=time.time(),
        ttft=0.05,
        total=0.4,
        completed=True,
        chunks=20,
        user_text=f"turn {n}",
        answers=None,
    )


async def test_turns_ending_within_the_linger_share_one_transaction(tmp_path: Path) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'cvi.db'}")
    recorder = TurnRecorder(store, linger=0.2)
    recorder.start()
    try:
        commits = store.commits
        for n in range(10):  # ten turns ending 10 ms apart, as under load
            recorder.submit(_sample(n))
            await asyncio.sleep(0.01)
        await asyncio.wait_for(recorder.queue.join(), 5)
        assert store.commits - commits == 1
        assert await store.count_events() == 10  # every turn stored, once
    finally:
        await recorder.aclose()
        await store.aclose()
