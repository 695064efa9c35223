"""The jail's egress attachment: a Unix socket on the host, bind-mounted read-only into the sandbox.

The sandbox has no network device but loopback. Its agent's proxy bridge connects to this socket once per
client connection and passes that connection's descriptor (SCM_RIGHTS) after a one-byte selector, so the
bytes then flow between the sandboxed client and the broker directly, with no relay in the agent. Everything
arriving here is hostile: one descriptor per message, and it must be a stream socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
from pathlib import Path

from ..base import EgressHandler

SELECTORS = (b"H", b"S")


class FdPassingListener:
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
        os.chmod(self.socket_path, 0o666)  # the sandbox's uid connects; only this sandbox sees the file
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                try:
                    kind, fds = await _recv_fd(loop, conn)
                except (OSError, ValueError, TimeoutError):
                    continue
            client = _checked_stream_socket(fds)
            if client is None:
                continue
            if kind not in SELECTORS:
                client.close()
                continue
            task = loop.create_task(self.handler(client, kind))
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


async def _recv_fd(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, list[int]]:
    """One byte and at most one descriptor; the sandbox decides what it sends, so anything else is refused."""
    conn.setblocking(False)
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        await asyncio.wait_for(ready, 5)
    finally:
        loop.remove_reader(conn.fileno())
    data, fds, flags, _ = socket.recv_fds(conn, 1, 1)
    if flags & socket.MSG_CTRUNC:  # more descriptors than asked for: they were closed by the kernel
        for fd in fds:
            os.close(fd)
        raise ValueError("too many descriptors")
    return data, fds


def _checked_stream_socket(fds: list[int]) -> socket.socket | None:
    """The passed descriptor must be a connected stream socket, or it is closed and ignored."""
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    fd = fds[0]
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError("not a socket")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            return None
        sock.setblocking(False)
        return sock
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.close(fd)
        return None
