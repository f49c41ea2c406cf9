"""A circuit breaker per upstream: stop hammering a dead upstream, try it again later.

Closed: requests go through; `failures` consecutive failures open it. Open: requests skip this
upstream at once (the next one in the persona's chain answers, or the fallback line) until
`reset` seconds have passed. Half-open: one trial request goes through; its success closes the
breaker, its failure opens it again. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import time


class CircuitBreaker:
    """The breaker of one upstream (see the module doc), shared by every persona using it.

    `name` labels metrics and logs (the upstream's URL); `failures` consecutive failures open
    it; after `reset` seconds open it lets one trial request through. Not thread-safe, by
    design: it is only touched from the event loop.
    """

    __slots__ = ("_failures", "_opened_at", "_trial", "failures", "last_error", "name", "reset")

    def __init__(self, name: str, failures: int = 3, reset: float = 10.0) -> None:
        self.name = name
        self.failures = failures
        self.reset = reset
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        #: The cause of the last failure (kept while open, so a skip can say why).
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`, computed from the clock (no timer to cancel)."""
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self.reset:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Whether a request may go to this upstream now."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial:
            self._trial = True  # one trial at a time
            return True
        return False

    def success(self) -> None:
        """The upstream answered (the upstream brain calls this on its first token): close the
        breaker and forget past failures."""
        self._failures = 0
        self._opened_at = None
        self._trial = False
        self.last_error = None

    def failure(self, cause: str | None = None) -> None:
        """A request failed (`cause`: why, one line, kept in `last_error`): count it; the
        threshold, or a failed trial, (re)opens the breaker."""
        self.last_error = cause
        self._trial = False
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.failures:
            self._opened_at = time.monotonic()
