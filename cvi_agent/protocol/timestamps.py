"""Timestamps from the wire as Unix seconds, or None when they are not a time we can use.

Peers send ISO-8601 strings, Unix seconds and Unix milliseconds, and a broken or hostile one
sends `1e400`, an integer of a thousand digits or the year 0. None of that may raise (a 500)
or be stored as a time no reader can handle: a value outside 1970 … 9999 is dropped, and the
caller keeps the raw value in the payload it stores.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

#: 9999-12-31T23:59:59Z, the last second `datetime` (and an ISO-8601 string) can express.
MAX_TIMESTAMP = 253402300799.0
#: Numbers above this are milliseconds (1e11 seconds is the year 5138).
MILLISECONDS_ABOVE = 1e11


def in_range(seconds: float) -> float | None:
    """`seconds` when it is a time between 1970 and 9999 (NaN and infinities are not)."""
    return seconds if 0.0 <= seconds <= MAX_TIMESTAMP else None


def parse_timestamp(value: Any) -> float | None:
    """ISO-8601 strings (`…Z`, with or without microseconds) or Unix seconds/milliseconds;
    None for anything else, including times out of range."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float's range
            return None
        return in_range(seconds / 1000.0 if seconds > MILLISECONDS_ABOVE else seconds)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return parse_timestamp(float(text))
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return in_range(parsed.timestamp())
    return None
