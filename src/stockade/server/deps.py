"""Request dependencies: the server and the caller's principal (API key, rate limit)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from ..errors import AuthenticationError, QuotaError
from .auth import Principal
from .service import Server


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a cost on every request.
async def server_of(request: HTTPConnection) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


async def principal(request: HTTPConnection) -> Principal:
    """The caller's key (HTTP requests and WebSocket handshakes alike), checked and rate-limited."""
    srv: Server = request.app.state.server
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not key:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    found = srv.keys.cached(key) or await asyncio.to_thread(srv.keys.authenticate, key)
    if found is None:
        raise AuthenticationError("invalid or revoked API key")
    request.scope.setdefault("state", {})["principal"] = found
    tenant = srv.settings.tenant(found.tenant)
    frees = releases(request.scope.get("method", "GET"), request.url.path)
    wait = 0.0 if frees else srv.limiter.allow(found.key_id, tenant.rate_limit, tenant.rate_burst)
    if wait:
        raise QuotaError(f"rate limit: this key may send {tenant.rate_limit:g} requests per second; "
                         f"retry in {wait:.2f}s", retry_after=wait)
    return found


def releases(method: str, path: str) -> bool:
    """Requests that free resources (ending a sandbox or context, signalling a process) are never refused by
    the rate limiter or a failing audit store: refusing them would keep the sandbox running, and holding
    quota, until its timeout."""
    return method == "DELETE" or (method == "POST" and path.endswith(("/signal", "/process.Process/SendSignal")))


Auth = Annotated[Principal, Depends(principal)]
Srv = Annotated[Server, Depends(server_of)]
