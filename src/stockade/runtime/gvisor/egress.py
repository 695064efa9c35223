"""gVisor's egress attachment: a Unix socket on the host, bind-mounted read-only into the sandbox, that the
Sentry may connect to (runsc --host-uds=open). gVisor's sockets live in its own kernel, so no descriptor can
cross: the agent's bridge opens one stream per client connection, sends the one-byte selector, then relays
the client's bytes over it (SandboxLayout.egress_relay). Everything arriving here is hostile: a stream that
does not start with a known selector within the deadline is closed.
"""

from __future__ import annotations

import asyncio
import socket

from ..egress_socket import SELECTORS, EgressSocket

SELECTOR_TIMEOUT = 5.0


class StreamListener(EgressSocket):
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._track(loop.create_task(self._serve(conn)))

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
