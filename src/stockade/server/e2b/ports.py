"""``get_host(port)``: a sandbox's own server (a dev server, an app), reached through stockade's server.

The SDKs name it ``{port}-{sandboxID}.{domain}``; ``HostRouting`` moves such requests (and the header form
with an ``E2b-Sandbox-Port`` other than envd's and the code interpreter's) under ``/e2b/ports``. Only the
ports in the sandbox policy's ``network.expose`` answer (the server's ``e2b_policy`` sets it for E2B
sandboxes); the caller shows the sandbox's traffic token (``E2B-Traffic-Access-Token``) unless the sandbox
was created with ``allowPublicTraffic``. Each request is audited as ``port.open``/``port.close``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, WebSocket
from starlette.types import Scope

from ...errors import StockadeError
from ..port_proxy import PortProxyResponse, proxy_websocket
from . import PORTS_PREFIX
from .core import SandboxGone, core_of
from .routing import E2BRoute, e2b_error

# what carried stockade's or E2B's credentials and routing: never passed to the server inside
DROPPED = (b"x-access-token", b"e2b-traffic-access-token", b"e2b-sandbox-id", b"e2b-sandbox-port", b"x-api-key")

router = APIRouter(route_class=E2BRoute, include_in_schema=False)


@router.api_route(PORTS_PREFIX + "/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def sandbox_port(rest: str, request: Request) -> Response:
    core = core_of(request)
    sandbox_id, port = request.headers.get("e2b-sandbox-id", ""), request.headers.get("e2b-sandbox-port", "")
    if not port.isdigit():
        return e2b_error(400, "the E2b-Sandbox-Port header is missing")
    try:
        await core.data_plane(request, sandbox_id, int(port))
    except SandboxGone as exc:
        return e2b_error(502, str(exc))
    core.port_check(sandbox_id, int(port))
    return PortProxyResponse(lambda: core.open_port(sandbox_id, int(port)), _target(request.scope), DROPPED)


@router.websocket(PORTS_PREFIX + "/{rest:path}")
async def sandbox_port_websocket(websocket: WebSocket, rest: str) -> None:
    """A WebSocket to the server inside (a dev server's hot reload); refusals close the handshake (1008)."""
    core = core_of(websocket)
    sandbox_id, port = websocket.headers.get("e2b-sandbox-id", ""), websocket.headers.get("e2b-sandbox-port", "")
    try:
        if not port.isdigit():
            raise SandboxGone(sandbox_id)
        await core.data_plane(websocket, sandbox_id, int(port))
        core.port_check(sandbox_id, int(port))
    except (SandboxGone, StockadeError) as exc:
        await websocket.close(code=1008, reason=str(exc)[:120])
        return
    await proxy_websocket(websocket, lambda: core.open_port(sandbox_id, int(port)), _target(websocket.scope),
                          DROPPED)


def _target(scope: Scope) -> bytes:
    raw: bytes = (scope.get("raw_path") or scope["path"].encode()).removeprefix(PORTS_PREFIX.encode())
    query = scope.get("query_string", b"")
    return (raw or b"/") + (b"?" + query if query else b"")
