"""Server-sent events: output and interpreter events as they come."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_event(kind: str, payload: Any) -> bytes:
    """Output (stdout, stderr: bytes, sent base64) or an interpreter event (already JSON)."""
    if kind == "event":
        return sse("event", payload)
    return sse(kind, {"b64": base64.b64encode(payload).decode()})


async def as_they_come(queue: asyncio.Queue[tuple[str, Any]],
                        task: asyncio.Future[Any]) -> AsyncIterator[tuple[str, Any]]:
    """The queue's items as they arrive until ``task`` is done, then the ones still in it."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        yield getter.result()
    while not queue.empty():
        yield queue.get_nowait()
