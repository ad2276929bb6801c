"""Times as status stores them: RFC 3339 UTC with milliseconds, and back to epoch seconds."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(t: float) -> str:
    """RFC 3339 UTC with milliseconds (what status.rollout stores)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
