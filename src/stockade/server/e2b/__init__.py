"""E2B's wire protocol as a front end of the server: the official, unmodified E2B SDKs (``e2b``,
``e2b-code-interpreter``, npm ``e2b``, ``@e2b/code-interpreter``) work against ``stockade serve`` with

    E2B_API_URL=http://HOST:PORT/e2b
    E2B_SANDBOX_URL=http://HOST:PORT/e2b/sandbox
    E2B_API_KEY=<a stockade API key>

- ``control.py``: the control plane (``/e2b/v2/sandboxes`` ...), authenticated by ``X-API-KEY``.
- ``envd.py``: what E2B's in-sandbox daemon serves on port 49983 (Connect RPC ``process.Process`` and
  ``filesystem.Filesystem``, ``/files``, ``/health``), authenticated by ``X-Access-Token``.
- ``interpreter.py``: the code interpreter on port 49999 (``/execute``, ``/contexts``), authenticated by
  ``E2B-Traffic-Access-Token``.
- ``ports.py``: every other port (``get_host(port)``): an HTTP proxy onto a server inside the sandbox, for
  the ports its policy's ``network.expose`` lists, authenticated by ``E2B-Traffic-Access-Token`` unless
  the sandbox was created with ``allowPublicTraffic``.
- ``routing.py``: which sandbox and port a data-plane request is for: the ``E2b-Sandbox-Id`` and
  ``E2b-Sandbox-Port`` headers, or a Host of the form ``{port}-{sandboxID}.{domain}``.
- ``core.py``: the only module that calls the server's and the manager's internals, so the checks
  (tenant, quotas, rate limit, policy gate, audit) are the native routes' own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

PREFIX = "/e2b"
SANDBOX_PREFIX = "/e2b/sandbox"
PORTS_PREFIX = "/e2b/ports"   # requests for a sandbox's own servers (get_host), moved here by HostRouting
E2B_UPLOAD = SANDBOX_PREFIX + "/files"   # the server's body cap leaves it to the route (max_upload)


def mount(app: FastAPI) -> None:
    """Add the E2B routes and the Host-based routing (outermost, so the audit sees the rewritten path)."""
    from .control import router as control
    from .envd import router as envd
    from .interpreter import router as interpreter
    from .ports import router as ports
    from .routing import HostRouting, unsupported

    app.include_router(envd)
    app.include_router(interpreter)
    app.include_router(ports)
    app.include_router(control)
    app.include_router(unsupported)  # last: anything else under /e2b answers "not supported" in E2B's shape
    app.add_middleware(HostRouting)
