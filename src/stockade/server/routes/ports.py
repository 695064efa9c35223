"""Routes: a sandbox's own servers (the ports its policy's ``network.expose`` lists), reached over HTTP.

``/sandboxes/{id}/ports/{port}/PATH`` is forwarded to ``PATH`` on that port inside (the agent's relay, one
connection per request or WebSocket, audited as ``port.open``/``port.close``), with the caller's API key
removed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, WebSocket
from starlette.types import Scope

from ...errors import StockadeError
from ..deps import Auth, Srv, principal
from ..port_proxy import PortProxyResponse, proxy_websocket
from ..service import Server, live_sandbox

router = APIRouter()
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
Port = Annotated[int, Path(ge=1, le=65535)]


# Not in the OpenAPI document: whatever the server inside speaks is its own API, not stockade's.
@router.api_route("/sandboxes/{sandbox_id}/ports/{port}/{rest:path}", methods=METHODS, include_in_schema=False)
async def sandbox_port(sandbox_id: str, port: Port, rest: str, request: Request, srv: Srv,
                       who: Auth) -> PortProxyResponse:
    """Whatever the server on ``port`` inside answers (502 when nothing listens there); 403 unless the
    policy's ``network.expose`` lists the port."""
    live_sandbox(srv, who, sandbox_id)
    srv.m.check_exposed(sandbox_id, port)
    return PortProxyResponse(lambda: srv.m.connect_port(sandbox_id, port, via="api"),
                             _target(request.scope, sandbox_id, port), CREDENTIALS)


@router.websocket("/sandboxes/{sandbox_id}/ports/{port}/{rest:path}")
async def sandbox_port_websocket(websocket: WebSocket, sandbox_id: str, port: int, rest: str) -> None:
    """The same for a WebSocket (a dev server's hot reload): relayed message by message. A refusal (key,
    sandbox, network.expose) closes the handshake with 1008 and the reason."""
    srv: Server = websocket.app.state.server
    try:
        who = await principal(websocket)
        live_sandbox(srv, who, sandbox_id)
        srv.m.check_exposed(sandbox_id, port)
    except StockadeError as exc:
        await websocket.close(code=1008, reason=str(exc)[:120])
        return
    await proxy_websocket(websocket, lambda: srv.m.connect_port(sandbox_id, port, via="api"),
                          _target(websocket.scope, sandbox_id, port), CREDENTIALS)


CREDENTIALS = (b"authorization", b"x-api-key")   # the caller's key for stockade: never passed inside


def _target(scope: Scope, sandbox_id: str, port: int) -> bytes:
    """The request target inside: the path after the route's prefix as the client encoded it, and the query."""
    prefix = f"/sandboxes/{sandbox_id}/ports/{port}".encode()
    raw: bytes = (scope.get("raw_path") or scope["path"].encode()).removeprefix(prefix)
    query = scope.get("query_string", b"")
    return (raw or b"/") + (b"?" + query if query else b"")
