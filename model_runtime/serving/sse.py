"""Server-sent events: the streams of the OpenAI API and of Triton's generate extension."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last event


def sse(data: Any) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8", "replace") + b"\n\n"


def event_stream(events) -> StreamingResponse:
    """A response streaming `events` (bytes) as server-sent events, unbuffered by proxies."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
