"""A real `stockade serve` app, run by uvicorn on 127.0.0.1 in a thread of the test process, so tests can
reach its manager (to map made-up names to local servers) and its database."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn

from stockade.config import HostConfig
from stockade.runtime.base import Runtime
from stockade.server.app import Server, create_app
from stockade.server.protocol import uvicorn_options
from stockade.server.settings import ServerSettings

from .waiting import wait_until


class RunningServer:
    def __init__(self, data_dir: Path | None = None, runtime: Runtime | None = None, **settings: Any) -> None:
        """``runtime``: the server's default runtime object (a test's fake), instead of the host's."""
        self.own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="stockade-test-server-"))
        try:
            self.settings = ServerSettings.model_validate({"data_dir": str(self.data_dir), **settings})
            self.app = create_app(self.settings, HostConfig.from_env(), runtime)
            self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                         lifespan="on", timeout_graceful_shutdown=5,
                                                         **uvicorn_options(self.settings)))
            self.thread = threading.Thread(target=self.uvicorn.run, name="stockade-test-server", daemon=True)
            self.thread.start()
            wait_until(lambda: self.uvicorn.started or not self.thread.is_alive(), 30, "the test server to start")
            if not self.uvicorn.started:
                raise RuntimeError("the test server's thread ended before it started")
        except BaseException:  # a server that did not start leaves no data directory behind either
            if self.own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def server(self) -> Server:
        return self.app.state.server  # type: ignore[no-any-return]

    def key(self, tenant: str = "test") -> str:
        return self.server.keys.create(tenant)[1]

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
