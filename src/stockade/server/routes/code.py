"""Routes: the code interpreter (cells as server-sent events, contexts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from ...errors import StockadeError, to_wire
from ..deps import Auth, Srv
from ..models import ContextOut, CreateContext, RunCode, context_out
from ..service import live_sandbox
from ..streams import SSE_HEADERS, as_they_come, sse, stream_event

router = APIRouter()


@router.post("/sandboxes/{sandbox_id}/code", tags=["code"], responses={200: {"content": {"text/event-stream": {}}}})
async def run_code(sandbox_id: str, body: RunCode, srv: Srv, who: Auth) -> StreamingResponse:
    live_sandbox(srv, who, sandbox_id)
    # what is refused before the cell starts (unknown context, bad timeout) is answered as an error, not a stream
    srv.m.check_cell(sandbox_id, body.code, language=body.language, context_id=body.context_id, timeout=body.timeout)
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(srv.m.run_code(
        sandbox_id, body.code, language=body.language, context_id=body.context_id, envs=body.envs,
        timeout=body.timeout, on_output=lambda s, d: queue.put_nowait((s, d)),
        on_event=lambda e: queue.put_nowait(("event", e))))

    async def events() -> AsyncIterator[bytes]:
        try:
            async for kind, payload in as_they_come(queue, task):
                yield stream_event(kind, payload)
            await srv.audit.commit()  # the cell's record is in the audit log before its result goes out
            try:
                done, _ = task.result()
                yield sse("done", {k: v for k, v in done.items() if k != "id"})
            except StockadeError as exc:
                yield sse("error", to_wire(exc)[1])
        finally:
            if not task.done():
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/sandboxes/{sandbox_id}/contexts", status_code=201, tags=["code"])
async def create_context(sandbox_id: str, body: CreateContext, srv: Srv, who: Auth) -> ContextOut:
    live_sandbox(srv, who, sandbox_id)
    return context_out(await srv.m.create_context(sandbox_id, body.language, body.cwd))


@router.get("/sandboxes/{sandbox_id}/contexts", tags=["code"])
async def list_contexts(sandbox_id: str, srv: Srv, who: Auth) -> list[ContextOut]:
    live_sandbox(srv, who, sandbox_id)
    return [context_out(c) for c in srv.m.list_contexts(sandbox_id)]


@router.post("/sandboxes/{sandbox_id}/contexts/{context_id}/restart", tags=["code"])
async def restart_context(sandbox_id: str, context_id: str, srv: Srv, who: Auth) -> ContextOut:
    live_sandbox(srv, who, sandbox_id)
    return context_out(await srv.m.restart_context(sandbox_id, context_id))


@router.delete("/sandboxes/{sandbox_id}/contexts/{context_id}", status_code=204, tags=["code"])
async def remove_context(sandbox_id: str, context_id: str, srv: Srv, who: Auth) -> Response:
    live_sandbox(srv, who, sandbox_id)
    await srv.m.remove_context(sandbox_id, context_id)
    return Response(status_code=204)
