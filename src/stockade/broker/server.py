"""One broker endpoint per sandbox: a Unix socket on the host; its events go to the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..policy import NetworkPolicy
from .proxy import Egress, Resolver, serve, system_resolver
from .rules import Rules, expand_groups
from .secrets import BoundSecret, SandboxCA, upstream_context

EVENTS_KEPT = 10000  # in memory, for sandbox.network.events(); the audit log keeps all


def rules_for(policy: NetworkPolicy, groups: dict[str, list[str]]) -> Rules:
    return Rules(expand_groups(list(policy.allow), groups), expand_groups(list(policy.deny), groups),
                 list(policy.allow_private))


class BrokerEndpoint:
    def __init__(self, sandbox_id: str, policy: NetworkPolicy, socket_dir: Path,
                 on_event: Callable[[dict[str, Any]], None],
                 resolver: Resolver = system_resolver, secrets: list[BoundSecret] | None = None,
                 ca: SandboxCA | None = None, groups: dict[str, list[str]] | None = None) -> None:
        self.groups = dict(groups or {})
        self.socket_dir = socket_dir
        self.on_event = on_event
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.egress = Egress(sandbox_id, rules_for(policy, self.groups), policy.max_connections,
                             policy.max_egress_bytes, self._record, resolver, list(secrets or []), ca,
                             upstream_context(policy.extra_ca_certs) if secrets else None)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / "broker.sock"

    async def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)  # the sandbox's uid connects; only this sandbox sees the file
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        """Each connection on the socket carries one client connection from inside the sandbox, passed as
        a descriptor (SCM_RIGHTS) after a one-byte protocol selector."""
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
            if client is None or kind not in (b"H", b"S"):
                continue
            task = loop.create_task(self._client(client, kind))
            self.egress.tasks.add(task)
            task.add_done_callback(self.egress.tasks.discard)

    async def _client(self, client: socket.socket, kind: bytes) -> None:
        # server-side streams (as start_server makes them), so TLS can be terminated here for secrets
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=65536)
        connected: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
        protocol = asyncio.StreamReaderProtocol(reader, lambda _r, w: connected.set_result(w))
        await loop.connect_accepted_socket(lambda: protocol, sock=client)
        writer = await connected
        reader.feed_data(kind)  # serve() reads the selector first, whatever carried it
        await serve(reader, writer, self.egress)

    def update(self, policy: NetworkPolicy) -> None:
        """New rules and limits apply to new connections at once."""
        self.egress.rules = rules_for(policy, self.groups)
        self.egress.max_connections = policy.max_connections
        self.egress.max_egress_bytes = policy.max_egress_bytes

    def _record(self, event: dict[str, Any]) -> None:
        event.pop("established", None)
        self.events.append(event)
        self.on_event(event)

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
        for task in list(self.egress.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.egress.tasks, return_exceptions=True)
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
        os.close(fd)
        return None
