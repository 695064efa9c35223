"""Routes: artifacts (readable after the sandbox ended, by its tenant only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..deps import Auth, Srv
from ..service import check_owner

router = APIRouter()


@router.get("/sandboxes/{sandbox_id}/artifacts", tags=["artifacts"])
async def list_artifacts(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
    await check_owner(srv, who, sandbox_id)  # also after it ended
    return [{**dataclasses.asdict(a), "created_at": a.created_at.timestamp()}
            for a in srv.m.artifacts.list(sandbox_id)]


@router.get("/sandboxes/{sandbox_id}/artifacts/{name}", tags=["artifacts"], response_class=StreamingResponse,
         responses={200: {"content": {"application/octet-stream": {}}}})
async def get_artifact(sandbox_id: str, name: str, srv: Srv, who: Auth) -> StreamingResponse:
    await check_owner(srv, who, sandbox_id)
    path = srv.m.artifacts.open(sandbox_id, name)

    def chunks() -> Any:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream")
