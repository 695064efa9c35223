"""Which sandbox and port a data-plane request is for, and E2B's error shape.

The SDKs name the sandbox and port in the ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` headers when
``E2B_SANDBOX_URL`` is set. Behind a wildcard name (E2B's own form, for which the SDKs need no URL
variables) the Host is ``{port}-{sandboxID}.{domain}``: ``HostRouting`` turns such a request into the
header form under ``/e2b/sandbox`` before anything else sees it, so both are one code path. A port other
than envd's and the code interpreter's is a sandbox's own server (get_host): its requests move under
``/e2b/ports``, so no path of that server's can reach an envd route. It also takes the signed ``/files``
URLs the SDKs build at the server's root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import StockadeError, to_wire
from . import E2B_UPLOAD, PORTS_PREFIX, PREFIX, SANDBOX_PREFIX
from .core import ENVD_PORT, INTERPRETER_PORT

# "49983-sbx-0123456789abcdef.sandbox.example.com[:443]": a port, a sandbox id (stockade's form only, so
# a server reached by a name such as 10-0-0-5.internal still serves its native API), then the domain
_HOST = re.compile(r"^([0-9]{1,5})-(sbx-[0-9a-f]{16})\.[^:]+(?::[0-9]+)?$")


class HostRouting:
    """Pure ASGI middleware: a request whose Host names a sandbox port becomes the header form."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope.get("headers") or []
            host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1").strip().lower()
            match = _HOST.match(host)
            if match is not None and not scope["path"].startswith(PREFIX + "/"):
                port, sandbox_id = match.groups()
                kept = [(k, v) for k, v in headers if k not in (b"e2b-sandbox-id", b"e2b-sandbox-port")]
                prefix = SANDBOX_PREFIX if int(port) in (ENVD_PORT, INTERPRETER_PORT) else PORTS_PREFIX
                scope = {**scope, "path": prefix + scope["path"], "raw_path": prefix.encode() + _raw(scope),
                         "headers": [*kept, (b"e2b-sandbox-id", sandbox_id.encode()),
                                     (b"e2b-sandbox-port", port.encode())]}
            elif scope["path"].startswith(SANDBOX_PREFIX + "/"):
                port = next((v for k, v in headers if k == b"e2b-sandbox-port"), b"").decode("latin-1").strip()
                if port.isdigit() and int(port) not in (ENVD_PORT, INTERPRETER_PORT):
                    scope = {**scope, "path": PORTS_PREFIX + scope["path"].removeprefix(SANDBOX_PREFIX),
                             "raw_path": PORTS_PREFIX.encode() + _raw(scope).removeprefix(SANDBOX_PREFIX.encode())}
            elif scope["path"] == "/files" and b"signature=" in scope.get("query_string", b""):
                # download_url()/upload_url(): the SDKs join "/files" to E2B_SANDBOX_URL as an absolute
                # path, which drops its /e2b/sandbox prefix; the signature then names the sandbox
                scope = {**scope, "path": E2B_UPLOAD, "raw_path": E2B_UPLOAD.encode()}
        await self.app(scope, receive, send)


def _raw(scope: Scope) -> bytes:
    """The path as the client sent it (percent-encoding kept: a server inside gets it unchanged)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return raw


def e2b_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """E2B's error body: the SDKs read ``code`` (the HTTP status, an int) and ``message``."""
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def error_response(exc: Exception) -> JSONResponse | None:
    """A stockade error, or a body that failed validation, in E2B's shape (None: not ours to answer)."""
    if isinstance(exc, StockadeError):
        status, body = to_wire(exc)
        retry = getattr(exc, "retry_after", None)
        return e2b_error(status, str(body.get("message", exc)),
                         {"Retry-After": str(max(1, round(retry)))} if retry else None)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return e2b_error(400, f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request body")
    if isinstance(exc, json.JSONDecodeError):
        return e2b_error(400, f"the body is not JSON: {exc}")
    return None


class E2BRoute(APIRoute):
    """A route whose errors are answered in E2B's shape instead of stockade's native one."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                answer = error_response(exc)
                if answer is None:
                    raise
                return answer

        return run


def not_supported(what: str) -> JSONResponse:
    return e2b_error(501, f"{what} is not supported by stockade's E2B front end (see the README's "
                          "compatibility table)")


unsupported = APIRouter(route_class=E2BRoute, include_in_schema=False)


@unsupported.api_route(PREFIX + "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def anything_else(rest: str, request: Request) -> Response:
    """Pause, resume, snapshots, forks, logs, templates, volumes, secrets: a clear refusal in E2B's shape."""
    from .core import core_of

    if rest.startswith("sandbox/"):
        # a data-plane path: only for a caller who holds the sandbox (else it is "not found", as always)
        sid, port = request.headers.get("e2b-sandbox-id", ""), request.headers.get("e2b-sandbox-port", "")
        if not port.isdigit():
            return e2b_error(400, "the E2b-Sandbox-Port header is missing")
        try:
            await core_of(request).data_plane(request, sid, int(port))
        except Exception as exc:
            return e2b_error(502, str(exc))
        return not_supported(f"{request.method} /{rest.removeprefix('sandbox/')}")
    await core_of(request).authenticate(request)  # a wrong key is told so, whatever the path
    return not_supported(f"{request.method} /{rest}")
