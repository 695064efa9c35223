"""Routes: the server's health and metrics, and sandboxes (create, list, get, kill, timeout, metrics)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ... import __version__
from ...policy import Policy
from ..deps import Auth, Srv
from ..models import CreateSandbox, SandboxOut, SetTimeout, TakeSnapshot, ended_rows, sandbox_out
from ..service import create_sandbox, live_sandbox

router = APIRouter()


@router.get("/health", tags=["server"])
async def health(srv: Srv) -> dict[str, Any]:
    """``status`` is "degraded" while the audit log cannot be written (new work is refused then)."""
    audit = srv.audit
    return {"status": "ok" if audit.state == "ok" else "degraded", "version": __version__,
            "sandboxes": len(srv.m.sandboxes), "warm": sum(len(p.ready) for p in srv.m.pools.values()),
            "warm_by_template": {p.template: len(p.ready) for p in srv.m.pools.values() if p.template},
            "audit": {"state": audit.state, "error": audit.error, "held": audit.held}}


@router.get("/metrics", tags=["server"], response_class=Response)
async def metrics(srv: Srv) -> Response:
    return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/sandboxes", status_code=201, tags=["sandboxes"])
async def create(body: CreateSandbox, srv: Srv, who: Auth, response: Response) -> SandboxOut:
    sb, reused = await create_sandbox(srv, who, Policy.from_dict(body.policy or {}), body.timeout, body.envs,
                                      body.metadata, body.user_id, body.runtime, body.template)
    if reused:
        response.status_code = 200
    return sandbox_out(srv, sb)


@router.get("/sandboxes", tags=["sandboxes"])
async def list_sandboxes(srv: Srv, who: Auth, state: Literal["running", "ended"] = "running",
                         metadata: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
                         user_id: str | None = None) -> list[SandboxOut]:
    want = dict(m.partition("=")[::2] for m in metadata or [])
    if state == "running":
        out = [sandbox_out(srv, sb) for sb in srv.m.owned_by(who.tenant)]
    else:
        out = await asyncio.to_thread(ended_rows, srv, who.tenant)
    return [o for o in out if all(o.metadata.get(k) == v for k, v in want.items())
            and (user_id is None or o.user_id == user_id)]


@router.get("/sandboxes/{sandbox_id}", tags=["sandboxes"])
async def get_sandbox(sandbox_id: str, srv: Srv, who: Auth) -> SandboxOut:
    return sandbox_out(srv, live_sandbox(srv, who, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
async def kill(sandbox_id: str, srv: Srv, who: Auth) -> Response:
    live_sandbox(srv, who, sandbox_id)
    await srv.m.kill(sandbox_id)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/metrics", tags=["sandboxes"])
async def sandbox_metrics(sandbox_id: str, srv: Srv, who: Auth, start: float | None = None,
                          end: float | None = None) -> list[dict[str, Any]]:
    """What the sandbox uses: a sample taken now, after the earlier ones kept (``start``/``end``: Unix time)."""
    live_sandbox(srv, who, sandbox_id)
    return [m.to_dict() for m in await srv.m.metrics(sandbox_id, start, end)]


@router.post("/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
async def set_timeout(sandbox_id: str, body: SetTimeout, srv: Srv, who: Auth) -> SandboxOut:
    live_sandbox(srv, who, sandbox_id)
    srv.m.set_timeout(sandbox_id, body.timeout)
    return sandbox_out(srv, srv.m.get(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/snapshot", status_code=201, tags=["sandboxes"])
async def snapshot(sandbox_id: str, body: TakeSnapshot, srv: Srv, who: Auth) -> dict[str, Any]:
    """Save a template sandbox's files as a new template of the server's store, which only this tenant's
    sandboxes may start from (``template`` of ``POST /sandboxes``). The sandbox keeps running."""
    live_sandbox(srv, who, sandbox_id)
    template = await srv.m.snapshot(sandbox_id, body.name, owner=who.tenant)
    return {"template": template.name, "from": template.source, "size": template.size,
            "layers": len(template.layers)}
