"""The pure ASGI middleware in front of every route: body caps, smuggling checks, the audit record of
every call, and answers held until their records are committed."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audit import AuditEvent
from .deps import releases
from .e2b import E2B_UPLOAD
from .service import Server

UNGATED = ("/health", "/metrics")


class Guard:
    """Pure ASGI middleware: caps request bodies (uploads excepted: their route counts), records every API
    call in the audit log with the tenant, key id, route template and status, and holds each answer until
    the request's records are committed (a result a client saw is in the audit log). While the audit log
    cannot be written, new work is refused with 503; ending sandboxes and processes still goes ahead."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        srv: Server | None = getattr(getattr(scope.get("app"), "state", None), "server", None)
        path, method = scope["path"], scope["method"]
        if srv is not None and srv.audit.state != "ok" and path not in UNGATED and not releases(method, path):
            srv.metrics.audit_refused.inc()
            await self._refuse(send, scope, started, 503, {
                "code": "audit_unavailable",
                "message": f"the audit log cannot be written ({srv.audit.error}); new work is refused until it "
                           f"can, so nothing runs unrecorded: free space in the server's data directory or fix "
                           f"its database (GET /health shows the audit store's state)"},
                [(b"retry-after", b"5")])
            return
        is_upload = (method == "PUT" and path.endswith("/files")) or (method == "POST" and path == E2B_UPLOAD)
        names = [name.lower() for name, _ in scope.get("headers") or []]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if b"transfer-encoding" in names and b"content-length" in names:
            # a front proxy and this server could disagree on where the body ends (request smuggling)
            await self._refuse(send, scope, started, 400, {"code": "invalid_request", "message": "a request may "
                               "not have both Content-Length and Transfer-Encoding"}, [(b"connection", b"close")])
            return
        too_large = {"code": "too_large", "message": f"request body over {self.max_body} bytes"}
        if not is_upload and length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._refuse(send, scope, started, 413, too_large, [(b"connection", b"close")])
            return
        if not is_upload:
            # Read the (small, JSON) body here: a body over the cap, also a chunked one without a length,
            # is answered 413 by this middleware (raised inside the app, FastAPI would report a parse error).
            buffered: list[Message] = []
            seen = 0
            while True:
                message = await receive()
                buffered.append(message)
                if message["type"] != "http.request":
                    break
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    await self._refuse(send, scope, started, 413, too_large, [(b"connection", b"close")])
                    return
                if not message.get("more_body", False):
                    break
            original = receive

            async def replay() -> Message:
                return buffered.pop(0) if buffered else await original()

            receive = replay

        recorded = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                self._record(scope, status, started)
                recorded = True
                if srv is not None and path not in UNGATED:
                    await srv.audit.commit()  # group commit: concurrent requests share one transaction
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if not recorded:
                self._record(scope, status, started)

    async def _refuse(self, send: Send, scope: Scope, started: float, status: int, body: dict[str, Any],
                      headers: list[tuple[bytes, bytes]]) -> None:
        """Answer without running the request (it is recorded all the same)."""
        await send_json(send, status, body, headers)
        self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        app = scope.get("app")
        srv: Server | None = getattr(getattr(app, "state", None), "server", None)
        if srv is None:
            return
        srv.metrics.requests.labels(str(status)).inc()
        principal = (scope.get("state") or {}).get("principal")
        route = getattr(scope.get("route"), "path", None) or "(unmatched)"
        sandbox_id = (scope.get("path_params") or {}).get("sandbox_id")
        kind = "audit.query" if route == "/events" else "api.request"
        srv.audit.record(AuditEvent(kind, {
            "method": scope["method"], "route": route, "status": status,
            "key_id": principal.key_id if principal else None,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3)},
            sandbox_id if isinstance(sandbox_id, str) and len(sandbox_id) <= 64 else None,
            principal.tenant if principal else None))


async def send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": data})
