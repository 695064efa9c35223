"""Routes: the templates a tenant may start sandboxes from: the server's shared ones (made on the host with
`stockade template import|build|base`) and the tenant's own snapshots. Another tenant's, and the host's
build cache, are to it templates that do not exist."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from ...errors import ConflictError
from ...templates import Template, TemplateInUseError
from ..deps import Auth, Srv
from ..service import tenant_template, visible_to

router = APIRouter()


def _out(t: Template, tenant: str) -> dict[str, Any]:
    c = t.config
    return {"name": t.name, "shared": not t.owner, "yours": bool(t.owner) and t.owner == tenant,
            "layers": len(t.layers), "size": t.size, "source": t.source, "created": t.created,
            "config": {"env": c.env, "working_dir": c.working_dir, "user": c.user, "start_command": c.start_command,
                       "ready_command": c.ready_command, "labels": c.labels}}


def _visible(srv: Srv, tenant: str, name: str) -> Template:
    t = tenant_template(srv, tenant, name)
    if t is None:
        raise HTTPException(404, f"no template named {name!r} on this server")
    return t


@router.get("/templates", tags=["templates"])
async def list_templates(srv: Srv, who: Auth) -> list[dict[str, Any]]:
    """The server's shared templates and this tenant's own snapshots."""
    templates = await asyncio.to_thread(srv.templates.list)
    return [_out(t, who.tenant) for t in templates if visible_to(t, who.tenant)]


@router.get("/templates/{name}", tags=["templates"])
async def get_template(name: str, srv: Srv, who: Auth) -> dict[str, Any]:
    return _out(await asyncio.to_thread(_visible, srv, who.tenant, name), who.tenant)


@router.delete("/templates/{name}", status_code=204, tags=["templates"], response_class=Response)
async def remove_template(name: str, srv: Srv, who: Auth) -> Response:
    """Remove one of this tenant's snapshots (409 while a sandbox runs from it). A shared template is the
    host's: `stockade template rm` there."""
    t = await asyncio.to_thread(_visible, srv, who.tenant, name)
    if not t.owner:
        raise HTTPException(403, f"template {name!r} is shared: the server's host removes it "
                                 "(`stockade template rm`)")
    try:
        await asyncio.to_thread(srv.templates.remove, name)
    except TemplateInUseError as exc:
        raise ConflictError(str(exc)) from None
    return Response(status_code=204)
