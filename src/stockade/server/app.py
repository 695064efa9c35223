"""The HTTP API: FastAPI routes over one Manager, for many tenants.

Every route but /health and /metrics needs an API key (``Authorization: Bearer sk_...`` or
``X-API-Key``). A sandbox of another tenant is answered exactly like one that never existed (404).
Errors are JSON ``{code, message}`` with a 4xx/5xx status. Streams (command output, code cells) are
server-sent events whose data are JSON objects; bytes travel base64-encoded. The routes are in
``routes/`` (one router per concern), the checks in ``service.py``, the middleware in ``middleware.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .. import __version__
from ..config import HostConfig
from ..runtime.base import Runtime
from .e2b import mount as mount_e2b
from .error_handlers import add_error_handlers
from .middleware import Guard
from .models import ERRORS
from .routes import artifacts, audit, code, commands, files, network, ports, sandboxes, templates
from .service import Server
from .settings import ServerSettings


def create_app(settings: ServerSettings, config: HostConfig | None = None, runtime: Runtime | None = None) -> FastAPI:
    config = config or HostConfig.from_env()
    if settings.data_dir is not None:
        config = dataclasses.replace(config, data_dir=settings.data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = Server(settings, config, runtime)
        await server.start()
        app.state.server = server
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="stockade", version=__version__, lifespan=lifespan, responses=ERRORS,
                  description="Sandboxes for untrusted, AI-written code. Authenticate with "
                              "`Authorization: Bearer <API key>`.")
    add_error_handlers(app)
    app.add_middleware(Guard, max_body=settings.max_body)

    for module in (sandboxes, commands, files, code, artifacts, network, ports, audit, templates):
        app.include_router(module.router)
    mount_e2b(app)  # E2B's wire protocol over the same checks (server/e2b/); its routing is outermost
    return app


def openapi_json(settings: ServerSettings | None = None) -> str:
    """The API's OpenAPI document, as committed in docs/openapi.json."""
    app = create_app(settings or ServerSettings(), HostConfig.from_env())
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
