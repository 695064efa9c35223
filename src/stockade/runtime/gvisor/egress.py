"""gVisor's egress attachment: a Unix socket on the host, bind-mounted read-only into the sandbox, that the
Sentry may connect to (runsc --host-uds=open). gVisor's sockets live in its own kernel, so no descriptor can
cross: the agent's bridge opens one stream per client connection, sends the one-byte selector, then relays
the client's bytes over it (SandboxLayout.egress_relay). Everything arriving here is hostile: a stream that
does not start with a known selector within the deadline is closed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

from ..base import EgressHandler

SELECTORS = (b"H", b"S")
SELECTOR_TIMEOUT = 5.0


class StreamListener:
    def __init__(self, socket_dir: Path, handler: EgressHandler) -> None:
        self.socket_dir = socket_dir
        self.handler = handler
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / "broker.sock"

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            kind = await asyncio.wait_for(loop.sock_recv(conn, 1), SELECTOR_TIMEOUT)
        except (OSError, TimeoutError):
            conn.close()
            return
        if kind not in SELECTORS:
            conn.close()
            return
        await self.handler(conn, kind)

    async def stop(self) -> None:
        # As for the jail's listener: the accept task must be gone before the listener's descriptor closes.
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
