"""Routes: the audit log, of the caller's tenant only."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query

from ...audit.events import EventFilter
from ..deps import Auth, Srv

router = APIRouter()


@router.get("/events", tags=["audit"])
async def events(srv: Srv, who: Auth, sandbox_id: str | None = None, user_id: str | None = None,
                 type: Annotated[str | None, Query(max_length=64)] = None,
                 since: float | None = None, until: float | None = None,
                 after_id: Annotated[int | None, Query(ge=0, le=1 << 62)] = None,
                 limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
    """Audit events of your tenant only, oldest first. Page with ``after_id`` (the last id you saw).
    Queries of the audit log itself are recorded as ``audit.query`` and shown only when ``type`` asks for
    them (else paging would never reach the end: each page's request adds a record)."""
    await asyncio.to_thread(srv.audit.flush)
    flt = EventFilter(tenant=who.tenant, sandbox_id=sandbox_id, user_id=user_id, type=type, since=since,
                      until=until, after_id=after_id, limit=limit,
                      exclude_type=None if (type or "").startswith("audit") else "audit.query")
    return [e.to_dict() for e in await asyncio.to_thread(srv.audit.query, flt)]
