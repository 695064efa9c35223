"""The host end of a sandbox's egress attachment, shared by the runtimes whose sandboxes reach the broker
through a Unix socket bind-mounted read-only into them: the listening socket, its accept loop's lifetime,
and the broker connections it has started. Each runtime says what one accepted connection carries
(``_accept_loop``): a passed descriptor (the jail) or the relayed bytes themselves (gVisor)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from abc import ABC, abstractmethod
from pathlib import Path

from .base import EgressHandler

SELECTORS = (b"H", b"S")   # the first byte of a connection: the HTTP proxy or the SOCKS5 port


class EgressSocket(ABC):
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
        path = str(self.socket_path)
        if len(os.fsencode(path)) < 100:
            self._listener.bind(path)
        else:   # longer than sun_path holds (a deep state directory): bound through the directory's descriptor
            fd = os.open(self.socket_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._listener.bind(f"/proc/self/fd/{fd}/{self.socket_path.name}")
            finally:
                os.close(fd)
        os.chmod(self.socket_path, 0o666)  # the sandbox's uid connects; only this sandbox sees the file
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(self._listener))

    @abstractmethod
    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections for as long as the listener lives, each handed to the broker's handler."""

    def _track(self, task: asyncio.Task[None]) -> None:
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def stop(self) -> None:
        # The accept task must have ended (its sock_accept un-registered the listener from the selector)
        # before the listener is closed: a descriptor closed while the loop still holds it in its selector
        # leaves a stale entry, and the next descriptor given that number (a pidfd, a client socket) is
        # then never watched: a sandbox's exit went unseen and its kill timed out.
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
