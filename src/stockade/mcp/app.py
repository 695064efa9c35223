"""Running the MCP server: over stdio (one client, the process's session) or over streamable HTTP.

Over HTTP a session is the SDK's ``Mcp-Session-Id``: this server keeps a sandbox per session, so it serves
the session (initialize handshake) protocol versions. The 2026-07-28 revision has no sessions; a client
that probes it (``server/discover`` with that version) is answered -32022 naming the versions served, and
the SDK's clients then fall back to the handshake. ``Front`` also checks the bearer token and ends a
session's sandboxes when its session ends: DELETE, the SDK's idle timeout (``Hub.reap_idle`` uses the
same period), a session id the SDK no longer knows, or the server's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .output import Scrubber
from .server import STDIO_SESSION, Hub, Options, build_server

log = logging.getLogger("stockade.mcp")

SESSION_IDLE = 30 * 60.0
MAX_BODY = 32 << 20
UNSUPPORTED_PROTOCOL_VERSION = -32022


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve_stdio(options: Options) -> None:
    """Serve one client on stdin/stdout until EOF (or SIGTERM/SIGINT); then kill its sandboxes."""
    from mcp.server.stdio import stdio_server

    hub = Hub(options)
    server = build_server(hub, lambda ctx: STDIO_SESSION)
    loop = asyncio.get_running_loop()

    async def stop(signum: int) -> None:
        # Cancelling the serve loop cannot work: the SDK reads stdin in a worker thread that a cancel waits
        # for, and the client still holds the pipe open. So: end the sandboxes, flush what the SDK's exit
        # handler flushes (the local manager's audit records), and leave.
        from ..sdk.portal import portal

        try:
            await hub.close_all()
        finally:
            await asyncio.to_thread(portal().close)
            os._exit(128 + signum)

    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if not stopping:
            stopping.append(loop.create_task(stop(signum)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, int(sig))
    try:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await asyncio.shield(hub.close_all())


def http_session_key(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The session a request over HTTP belongs to: the SDK's session id. The SDK's session manager has
    already refused ids it does not know, and ids created with another credential, before a handler runs."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get("mcp-session-id") if headers is not None else None
    return value if isinstance(value, str) and value else None


def http_client_api_key(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """In pass-through mode (no token of its own; a stockade server behind it), the client's bearer is its
    stockade API key, and its session's sandboxes are created with it: the server's tenant, quotas, policy
    gate and audit are that client's. ``Front`` has bound the session to that key."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get("authorization") if headers is not None else None
    if isinstance(value, str) and value[:7].lower() == "bearer " and value[7:].strip():
        return value[7:].strip()
    return None


class Front:
    """ASGI in front of the SDK's streamable HTTP app: bearer token, protocol era, session ends.

    The bearer check is written here rather than through the SDK's auth settings: those make the server an
    OAuth 2.1 resource server (issuer, resource URL, token introspection), and one static token compared in
    constant time is all this needs. With no token of its own (``token`` None: pass-through to a stockade
    server), a client's bearer is its stockade API key, which the server checks on each use; a session
    belongs to the key that opened it, and the same session id with another key is answered as unknown."""

    def __init__(self, inner: ASGIApp, hub: Hub, token: str | None, idle: float) -> None:
        self.inner, self.hub, self.idle = inner, hub, idle
        self.expected = f"Bearer {token}".encode() if token is not None else None
        self.session_keys: dict[str, bytes] = {}   # pass-through: session id -> sha256 of the key that opened it
        self._reaper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] == "websocket":  # not an MCP transport; never passed on unauthenticated
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        authorization = headers.get("authorization", b"")
        if self.expected is not None:
            allowed = hmac.compare_digest(authorization, self.expected)
        else:
            allowed = authorization[:7].lower() == b"bearer " and len(authorization[7:].strip()) >= 8
        if not allowed:
            await _json(send, 401, {"error": "unauthorized",
                                    "message": "missing or wrong bearer token: send Authorization: Bearer <token> "
                                               "(the token given to `stockade mcp --token` or STOCKADE_MCP_TOKEN)"
                                               if self.expected is not None else
                                               "missing bearer: send Authorization: Bearer <your stockade API key>"},
                        [(b"www-authenticate", b'Bearer realm="stockade-mcp"')])
            return
        version = headers.get("mcp-protocol-version", b"").decode("latin-1")
        if version and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await self._refuse_era(version, receive, send)
            return
        session = headers.get("mcp-session-id", b"").decode("latin-1") or None
        owner = hashlib.sha256(authorization).digest()
        if self.expected is None and session is not None and not hmac.compare_digest(
                self.session_keys.get(session, owner), owner):
            await _json(send, 404, {"jsonrpc": "2.0", "id": None,
                                    "error": {"code": -32001, "message": "Session not found"}})
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if self.expected is None and session is None:  # a new session: it is this key's
                    opened = dict(message.get("headers") or []).get(b"mcp-session-id")
                    if opened:
                        self.session_keys[opened.decode("latin-1")] = owner
            await send(message)

        try:
            await self.inner(scope, receive, watch)
        finally:
            if session and (scope["method"] == "DELETE" and 200 <= status < 300 or status == 404):
                self.session_keys.pop(session, None)
                if session in self.hub.sessions:
                    await asyncio.shield(self.hub.close(session))

    async def _refuse_era(self, version: str, receive: Receive, send: Send) -> None:
        body, more = b"", True
        while more and len(body) < 1 << 16:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request_id: Any = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            request_id = json.loads(body).get("id")
        await _json(send, 400, {"jsonrpc": "2.0", "id": request_id if isinstance(request_id, int | str) else None,
                                "error": {"code": UNSUPPORTED_PROTOCOL_VERSION,
                                          "message": "stockade keeps a sandbox per MCP session, so it serves the "
                                                     "session (initialize) protocol versions",
                                          "data": {"supported": list(HANDSHAKE_PROTOCOL_VERSIONS),
                                                   "requested": version[:64]}}})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def on_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                if self._reaper:
                    self._reaper.cancel()
                await self.hub.close_all()  # while the SDK's session manager still runs
            return message

        async def on_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
            await send(message)

        await self.inner(scope, on_receive, on_send)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.idle / 4))
            try:
                await self.hub.reap_idle(self.idle)
            except Exception:
                log.exception("closing idle sessions failed")


async def _json(send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": data})


def http_app(options: Options, token: str | None, host: str = "127.0.0.1", idle: float = SESSION_IDLE) -> Front:
    """``token`` None: pass-through to the stockade server at ``options.api_url``, each client with its own
    stockade API key as its bearer (there must be such a server, and no server key of its own)."""
    if token is None and (options.api_url is None or options.api_key is not None):
        raise ValueError("pass-through needs a stockade server (api_url) and no API key of the MCP server's own")
    hub = Hub(options, Scrubber.for_host([options.api_key, token], options.policy, local=not options.api_url))
    server = build_server(hub, http_session_key, http_client_api_key if token is None else lambda ctx: None)
    # room for the largest arguments the tools accept (tools.MAX_WRITE characters, JSON-escaped), so a call
    # that is too big is refused by the tool's own validation, naming the field, not by the transport
    inner = server.streamable_http_app(host=host, session_idle_timeout=idle, max_request_body_size=MAX_BODY)
    return Front(inner, hub, token, idle)


async def serve_http(options: Options, token: str | None, host: str, port: int) -> None:
    import uvicorn

    app = http_app(options, token, host)
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                        timeout_graceful_shutdown=5))

    async def announce() -> None:
        while not srv.started:
            if srv.should_exit:
                return
            await asyncio.sleep(0.02)
        bound = srv.servers[0].sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"stockade mcp: serving MCP (streamable HTTP) at http://{shown}:{bound}/mcp", file=sys.stderr,
              flush=True)

    await asyncio.gather(srv.serve(), announce())
