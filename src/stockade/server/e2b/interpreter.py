"""E2B's code interpreter (port 49999) over stockade's: ``POST /execute`` answers NDJSON (one JSON object
a line, no blank lines): ``stdout``/``stderr`` with timestamps, ``result`` with every format and
``is_main_result``, ``error``, ``number_of_executions``, ``end_of_execution``; ``/contexts`` creates, lists,
restarts and deletes contexts. Languages: python, javascript (``js``), bash; others are refused by name.
Authenticated by ``E2B-Traffic-Access-Token`` (the sandbox's ``trafficAccessToken``)."""

from __future__ import annotations

import asyncio
import codecs
import datetime
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import PolicyError, SandboxNotFoundError, StockadeError, to_wire
from ...sdk.code import FORMATS
from ..streams import as_they_come
from . import SANDBOX_PREFIX
from .core import INTERPRETER_PORT, Core, E2BSandbox, SandboxGone, core_of

router = APIRouter(prefix=SANDBOX_PREFIX, include_in_schema=False)
LANGUAGES = {"python": "python", "javascript": "javascript", "js": "javascript", "bash": "bash"}


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Execute(_In):
    code: Annotated[str, Field(max_length=1 << 20)]
    context_id: Annotated[str, Field(max_length=64)] | None = None
    language: Annotated[str, Field(max_length=32)] | None = None
    env_vars: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=1 << 16)]] | None = None


class NewContext(_In):
    language: Annotated[str, Field(max_length=32)] | None = None
    cwd: Annotated[str, Field(max_length=4096)] | None = None


def _error(exc: BaseException) -> Response:
    """The code interpreter's errors are plain text; the SDKs read the status (404: NotFoundException,
    502: the sandbox is gone)."""
    if isinstance(exc, SandboxGone):
        return PlainTextResponse(str(exc), status_code=502)
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        return PlainTextResponse(f"{where}: {errors[0]['msg'] if errors else 'invalid'}", status_code=400)
    if isinstance(exc, StockadeError):
        return PlainTextResponse(str(exc), status_code=to_wire(exc)[0])
    raise exc


async def _auth(request: Request) -> tuple[Core, E2BSandbox]:
    core = core_of(request)
    port = request.headers.get("e2b-sandbox-port", "")
    if port != str(INTERPRETER_PORT):
        raise PolicyError("E2b-Sandbox-Port", f"the code interpreter is on port {INTERPRETER_PORT}")
    return core, await core.data_plane(request, request.headers.get("e2b-sandbox-id", ""), INTERPRETER_PORT)


def _language(name: str | None) -> str:
    if name is None:
        return "python"
    lang = LANGUAGES.get(name.lower())
    if lang is None:
        raise PolicyError("language", f"{name!r} is not supported; stockade's code interpreter runs "
                                      f"{', '.join(sorted(LANGUAGES))}")
    return lang


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _result(event: dict[str, Any]) -> dict[str, Any]:
    """A stockade ``result`` event (a MIME bundle from user code's process: untrusted) in E2B's form."""
    out: dict[str, Any] = {"type": "result", "is_main_result": bool(event.get("main"))}
    extra: dict[str, Any] = {}
    data = event.get("data")
    for mime, value in (data.items() if isinstance(data, dict) else ()):
        attr = FORMATS.get(mime)
        if attr == "json":
            out["json"] = value
        elif attr is not None and isinstance(value, str):
            out[attr] = value
        elif mime == "application/pdf" and isinstance(value, str):
            out["pdf"] = value
        elif isinstance(mime, str) and len(extra) < 32:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


@router.post("/execute")
async def execute(request: Request) -> Response:
    try:
        core, e2b = await _auth(request)
        body = Execute.model_validate_json(await request.body())
        language = _language(body.language) if body.context_id is None else "python"
    except (StockadeError, SandboxGone, ValidationError) as exc:
        return _error(exc)
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(core.run_code(
        e2b.id, body.code, language=language, context_id=body.context_id, envs=body.env_vars,
        on_output=lambda s, d: queue.put_nowait((s, d)), on_event=lambda e: queue.put_nowait(("event", e))))
    # errors before the cell runs (an unknown context, say) are answered as errors, not as a stream
    await asyncio.wait({task, asyncio.ensure_future(asyncio.sleep(0.05))}, return_when=asyncio.FIRST_COMPLETED)
    failed = task.exception() if task.done() else None
    if failed is not None:
        if isinstance(failed, SandboxNotFoundError) and "code context" in str(failed):
            return PlainTextResponse(f"Context {body.context_id} not found", status_code=404)
        return _error(failed)
    return StreamingResponse(_lines(core, queue, task), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _lines(core: Core, queue: asyncio.Queue[tuple[str, Any]], task: asyncio.Future[Any]) -> AsyncIterator[bytes]:
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
    try:
        async for kind, item in as_they_come(queue, task):
            for line in _convert(decoders, kind, item):
                yield line
        await core.commit()  # the cell's record is in the audit log before its end goes out
        try:
            done, _ = task.result()
        except StockadeError as exc:
            yield _line({"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": ""})
        else:
            count = done.get("execution_count")
            if isinstance(count, int) and count > 0:
                yield _line({"type": "number_of_executions", "execution_count": count})
        yield _line({"type": "end_of_execution"})
    finally:
        if not task.done():
            task.cancel()


def _convert(decoders: dict[str, Any], kind: str, item: Any) -> list[bytes]:
    if kind in decoders:
        text = decoders[kind].decode(item)
        return [_line({"type": kind, "text": text, "timestamp": _now()})] if text else []
    if not isinstance(item, dict):
        return []
    if item.get("type") == "result":
        return [_line(_result(item))]
    if item.get("type") == "error":
        return [_line({"type": "error", "name": str(item.get("name", "Error"))[:200],
                       "value": str(item.get("value", ""))[:10000],
                       "traceback": str(item.get("traceback", ""))[:100000]})]
    return []


def _context(ctx: Any) -> dict[str, Any]:
    return {"id": ctx.id, "language": ctx.language, "cwd": ctx.cwd}


@router.post("/contexts")
async def create_context(request: Request) -> Response:
    try:
        core, e2b = await _auth(request)
        raw = await request.body()
        body = NewContext.model_validate_json(raw) if raw.strip() else NewContext()
        ctx = await core.create_context(e2b.id, _language(body.language), body.cwd)
    except (StockadeError, SandboxGone, ValidationError) as exc:
        return _error(exc)
    return JSONResponse(_context(ctx))


@router.get("/contexts")
async def list_contexts(request: Request) -> Response:
    try:
        core, e2b = await _auth(request)
        contexts = core.list_contexts(e2b.id)
    except (StockadeError, SandboxGone) as exc:
        return _error(exc)
    return JSONResponse([_context(c) for c in contexts])


@router.post("/contexts/{context_id}/restart")
async def restart_context(context_id: str, request: Request) -> Response:
    try:
        core, e2b = await _auth(request)
        await core.restart_context(e2b.id, context_id)
    except (StockadeError, SandboxGone) as exc:
        return _error(exc)
    return Response(status_code=204)


@router.delete("/contexts/{context_id}")
async def remove_context(context_id: str, request: Request) -> Response:
    try:
        core, e2b = await _auth(request)
        await core.remove_context(e2b.id, context_id)
    except (StockadeError, SandboxGone) as exc:
        return _error(exc)
    return Response(status_code=204)
