"""Routes: a live sandbox's network rules and its broker's events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import Auth, Srv
from ..service import live_sandbox

router = APIRouter()


@router.patch("/sandboxes/{sandbox_id}/network", tags=["network"])
async def update_network(sandbox_id: str, body: dict[str, Any], srv: Srv, who: Auth) -> dict[str, Any]:
    sb = live_sandbox(srv, who, sandbox_id)
    srv.settings.tenant(who.tenant).check(sb.policy.with_overrides(network=body))  # the same gate as create
    return srv.m.update_network(sandbox_id, body).model_dump()


@router.get("/sandboxes/{sandbox_id}/network/events", tags=["network"])
async def network_events(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
    live_sandbox(srv, who, sandbox_id)
    return srv.m.network_events(sandbox_id)
