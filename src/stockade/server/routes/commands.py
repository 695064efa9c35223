"""Routes: commands (run, stream, list, kill all, stdin, signals)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from ...errors import RequestError, StockadeError, to_wire
from ...sdk.models import CommandResult
from ..deps import Auth, Srv
from ..models import CommandOut, PtySizeBody, RunCommand, SignalBody, b64_field
from ..service import live_sandbox
from ..streams import SSE_HEADERS, as_they_come, sse, stream_event

router = APIRouter()


@router.post("/sandboxes/{sandbox_id}/commands", tags=["commands"], response_model=CommandOut,
          responses={200: {"content": {"text/event-stream": {}}}})
async def run_command(sandbox_id: str, body: RunCommand, request: Request, srv: Srv, who: Auth) -> Any:
    live_sandbox(srv, who, sandbox_id)
    if (body.cmd is None) == (body.argv is None):
        raise RequestError("give exactly one of cmd (a shell command line) or argv (a list)")
    stdin = b64_field(body.stdin, "stdin") if body.stdin is not None else None
    streaming = "text/event-stream" in request.headers.get("accept", "")
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    started = time.perf_counter()
    record = await srv.m.start_command(
        sandbox_id, body.cmd if body.cmd is not None else body.argv or [], envs=body.envs, cwd=body.cwd,
        stdin=stdin, stdin_open=body.background and stdin is None, timeout=body.timeout,
        background=body.background, on_output=(lambda s, d: queue.put_nowait((s, d))) if streaming else None,
        pty=(body.pty.rows, body.pty.cols) if body.pty is not None else None)

    async def finish() -> CommandResult:
        result = await srv.m.result_of(sandbox_id, record)
        srv.metrics.exec_seconds.observe(time.perf_counter() - started)
        return result

    def ended(r: CommandResult) -> dict[str, Any]:
        return {"exit_code": r.exit_code, "timed_out": r.timed_out, "truncated": r.truncated, "limit": r.limit,
                "error": r.error}

    if not streaming and body.background:  # started: the caller follows it with signal/stdin/list
        return CommandOut(pid=record.pid, exit_code=None, stdout="", stderr="", timed_out=False, truncated=False,
                          running=True)
    if not streaming:
        result = await finish()
        return CommandOut(pid=record.pid, stdout=result.stdout, stderr=result.stderr, **ended(result))

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            yield sse("start", {"pid": record.pid})
            waiter = asyncio.ensure_future(finish())
            async for kind, data in as_they_come(queue, waiter):
                yield stream_event(kind, data)
            await srv.audit.commit()  # the command's record is in the audit log before its result goes out
            try:
                yield sse("exit", ended(waiter.result()))
            except StockadeError as exc:
                yield sse("error", to_wire(exc)[1])
            finished = True
        finally:
            if not finished and not body.background:  # the caller went away: its command goes too
                with contextlib.suppress(Exception):
                    await srv.m.signal(sandbox_id, record.pid, 9)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/sandboxes/{sandbox_id}/commands", tags=["commands"])
async def list_commands(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
    live_sandbox(srv, who, sandbox_id)
    return [dataclasses.asdict(p) for p in await srv.m.processes(sandbox_id)]


@router.post("/sandboxes/{sandbox_id}/commands/kill", tags=["commands"])
async def kill_all_commands(sandbox_id: str, srv: Srv, who: Auth) -> dict[str, int]:
    """Kill every process in the sandbox but its agent; the sandbox stays usable."""
    live_sandbox(srv, who, sandbox_id)
    return {"killed": await srv.m.kill_all(sandbox_id)}


@router.post("/sandboxes/{sandbox_id}/commands/{pid}/stdin", tags=["commands"], status_code=204,
          openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def send_stdin(sandbox_id: str, pid: Annotated[int, PathParam(ge=1, le=1 << 22)], request: Request,
                     srv: Srv, who: Auth, eof: bool = False) -> Response:
    live_sandbox(srv, who, sandbox_id)
    await srv.m.send_stdin(sandbox_id, pid, await request.body(), eof)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/commands/{pid}/resize", tags=["commands"])
async def resize_pty(sandbox_id: str, pid: Annotated[int, PathParam(ge=1, le=1 << 22)], body: PtySizeBody,
                     srv: Srv, who: Auth) -> dict[str, bool]:
    """A pty process's terminal size; ``resized`` is false when no such process runs."""
    live_sandbox(srv, who, sandbox_id)
    return {"resized": await srv.m.resize(sandbox_id, pid, body.rows, body.cols)}


@router.post("/sandboxes/{sandbox_id}/commands/{pid}/signal", tags=["commands"])
async def send_signal(sandbox_id: str, pid: Annotated[int, PathParam(ge=1, le=1 << 22)], body: SignalBody,
                      srv: Srv, who: Auth) -> dict[str, bool]:
    live_sandbox(srv, who, sandbox_id)
    return {"delivered": await srv.m.signal(sandbox_id, pid, body.signal)}
