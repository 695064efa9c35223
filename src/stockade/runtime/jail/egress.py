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
import socket
import stat

from ..egress_socket import SELECTORS, EgressSocket


class FdPassingListener(EgressSocket):
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
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
            self._track(loop.create_task(self.handler(client, kind)))


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
