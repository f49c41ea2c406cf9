"""Handlers for client tools that the room bot answers (named by a persona's `handler`)."""

from __future__ import annotations

import hashlib
from typing import Any


async def demo_weather(args: dict[str, Any], ctx: Any = None) -> dict[str, Any]:
    """A deterministic stand-in weather service for demos and tests (no network)."""
    location = str(args.get("location") or "somewhere").strip() or "somewhere"
    unit = str(args.get("unit") or "fahrenheit")
    digest = int(hashlib.sha256(location.lower().encode()).hexdigest()[:8], 16)
    temp_f = 50 + digest % 40
    temp = temp_f if unit == "fahrenheit" else round((temp_f - 32) * 5 / 9)
    sky = ("sunny", "cloudy", "breezy", "rainy")[digest % 4]
    symbol = "F" if unit == "fahrenheit" else "C"
    return {
        "location": location,
        "temperature": temp,
        "unit": unit,
        "conditions": sky,
        "summary": f"{temp} degrees {symbol} and {sky} in {location}",
    }
