"""Routes: files (streamed download and upload, and the file operations)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ...errors import FilesystemError, RequestError
from ..deps import Auth, Srv
from ..error_handlers import TooLarge
from ..models import FileOpBody
from ..service import live_sandbox

router = APIRouter()


@router.get("/sandboxes/{sandbox_id}/files", tags=["files"], response_class=StreamingResponse,
         responses={200: {"content": {"application/octet-stream": {}}}})
async def download(sandbox_id: str, path: Annotated[str, Query(min_length=1, max_length=4096)],
                   srv: Srv, who: Auth) -> StreamingResponse:
    live_sandbox(srv, who, sandbox_id)
    info = await srv.m.file_op(sandbox_id, "stat", path=path)
    size = info.get("entry", {}).get("size", 0) if isinstance(info.get("entry"), dict) else 0
    if isinstance(size, int) and size > srv.settings.max_upload:
        raise TooLarge(f"{path} is {size} bytes, over the server's max_upload ({srv.settings.max_upload})")
    chunks = await srv.m.open_read(sandbox_id, path)  # a refusal is answered here, before the stream
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.put("/sandboxes/{sandbox_id}/files", tags=["files"],
         openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def upload(sandbox_id: str, path: Annotated[str, Query(min_length=1, max_length=4096)], request: Request,
                 srv: Srv, who: Auth) -> dict[str, Any]:
    live_sandbox(srv, who, sandbox_id)
    cap = srv.settings.max_upload
    over = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal over
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                over = True
                return
            yield chunk

    size = await srv.m.write_chunks(sandbox_id, path, body())
    if over:
        with contextlib.suppress(FilesystemError):
            await srv.m.file_op(sandbox_id, "remove", path=path)
        raise TooLarge(f"the upload is over the server's max_upload ({cap} bytes); nothing was kept")
    return {"path": path, "size": size}


@router.post("/sandboxes/{sandbox_id}/files/{op}", tags=["files"])
async def file_op(sandbox_id: str, op: Literal["stat", "list", "mkdir", "remove", "rename"], body: FileOpBody,
                  srv: Srv, who: Auth) -> dict[str, Any]:
    live_sandbox(srv, who, sandbox_id)
    args = {k: v for k, v in body.model_dump().items() if v is not None}
    needed = ("src", "dst") if op == "rename" else ("path",)
    if not all(k in args for k in needed):
        raise RequestError(f"{op} needs {' and '.join(needed)}")
    return await srv.m.file_op(sandbox_id, op, **args)
