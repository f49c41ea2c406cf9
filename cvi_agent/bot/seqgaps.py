"""Gaps in the replica's `seq` numbers: events the bot never received.

Tavus numbers the events of a conversation with a monotonic `seq` (TAVUS_PROTOCOL §3). A hole in
the numbers the bot received means events were sent while it could not hear them: its
connection dropped and it rejoined, or no bot was in the room during a worker handover. The
events themselves are gone (the room does not replay app-messages), so the bot records the hole
instead: one `bot.seq_gap` record per hole, `{"after": N, "before": M, "missing": M - N - 1}`.

Arrival order is not send order (daily-python and the network may reorder a burst), so a hole
is only reported once a later event has been waiting above it for `window` seconds (or when too
many events wait above holes, or when the bot stops). An event that arrives within the window
fills its hole silently; one that arrives after its hole was reported is still stored, and
counted as `late`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WINDOW = 1.0
DEFAULT_MAX_HELD = 512


@dataclass(frozen=True, slots=True)
class SeqGap:
    """One hole: the numbers strictly between `after` and `before` were never received."""

    after: int  # the last seq received before the hole
    before: int  # the first seq received after it

    @property
    def missing(self) -> int:
        """How many events the hole lost."""
        return self.before - self.after - 1

    def as_dict(self) -> dict[str, int]:
        """The `bot.seq_gap` record's payload."""
        return {"after": self.after, "before": self.before, "missing": self.missing}


class SeqGaps:
    """Follows one sequence of `seq` numbers and reports holes through `on_gap`.

    Runs on the loop's thread (it arms a timer with `call_later`); `see()` is O(1) amortized.
    """

    def __init__(
        self,
        on_gap: Callable[[SeqGap], None],
        *,
        window: float = DEFAULT_WINDOW,
        max_held: int = DEFAULT_MAX_HELD,
    ) -> None:
        """`on_gap` is called on the loop's thread, once per hole, in seq order. `window`:
        seconds an event may wait above a hole before the hole is reported. `max_held`: events
        waiting above holes before every hole is reported at once (bounds the memory)."""
        self.on_gap = on_gap
        self.window = window
        self.max_held = max_held
        # Every seq up to `high` was received or reported missing; None until the first one.
        self.high: int | None = None
        self.gaps = 0
        self.missing = 0
        self.late = 0
        self._ahead: dict[int, float] = {}  # seq received above a hole → when (loop time)
        self._reported: deque[SeqGap] = deque(maxlen=32)
        self._timer: asyncio.TimerHandle | None = None

    def start_after(self, seq: int) -> None:
        """What was already received (e.g. stored by a previous bot): numbers after it count."""
        if self.high is None:
            self.high = seq

    def see(self, seq: int) -> None:
        """One received number, in arrival order; duplicates and late ones are absorbed."""
        high = self.high
        if high is None:
            self.high = seq  # the first event sets the baseline: nothing before it is missing
            return
        if seq <= high:
            if any(g.after < seq < g.before for g in self._reported):
                self.late += 1
            return  # a duplicate, or a late one
        if seq == high + 1:
            self._advance(seq)
            return
        if seq in self._ahead:
            return
        loop = asyncio.get_running_loop()
        self._ahead[seq] = loop.time()
        if len(self._ahead) > self.max_held:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._expire)

    def flush(self) -> None:
        """Report every hole below the highest seq received (the bot is stopping)."""
        self._cancel()
        if self._ahead:
            self._report_up_to(max(self._ahead))

    def close(self) -> None:
        """Stop the timer without reporting what is still open (`flush` reports it)."""
        self._cancel()

    # internals

    def _advance(self, seq: int) -> None:
        self.high = seq
        ahead = self._ahead
        while ahead and self.high + 1 in ahead:
            self.high += 1
            del ahead[self.high]
        if not ahead:
            self._cancel()

    def _expire(self) -> None:
        self._timer = None
        if not self._ahead:
            return
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.window
        settled = [s for s, at in self._ahead.items() if at <= cutoff]
        if settled:
            self._report_up_to(max(settled))
        if self._ahead:  # holes opened less than `window` ago: look again when they are due
            due = min(self._ahead.values()) + self.window - loop.time()
            self._timer = loop.call_later(max(due, 0.01), self._expire)

    def _report_up_to(self, top: int) -> None:
        """Report the holes below `top` (a seq that was received) and move past it."""
        assert self.high is not None
        previous = self.high
        for seq in sorted(s for s in self._ahead if s <= top):
            del self._ahead[seq]
            if seq > previous + 1:
                self._gap(SeqGap(previous, seq))
            previous = seq
        self._advance(top)

    def _gap(self, gap: SeqGap) -> None:
        self.gaps += 1
        self.missing += gap.missing
        self._reported.append(gap)
        self.on_gap(gap)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["SeqGap", "SeqGaps"]
