"""Inbound: the owner reaches a TCP port inside a sandbox (a dev server's preview, an app's API).

Off by default: only the ports in the policy's ``network.expose`` are reachable, and only through the
agent's relay over the channel (``runtime.port_stream``), so the sandbox gets no route from outside and
nothing changes for its egress. Every connection is audited (``port.open``, and ``port.close`` with its
byte counts). Front ends: ``connect_port`` for one connection (the server's HTTP proxy), ``forward_port``
for a loopback listener on the host that relays each connection it accepts (the SDK's local mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from ..errors import PolicyError
from ..runtime.port_stream import PortStream, relay
from .base import CoreBase
from .sandboxes import ManagedSandbox


class Ports(CoreBase):
    def check_exposed(self, sandbox_id: str, port: int) -> None:
        """PolicyError unless ``port`` of the live sandbox may be reached from outside."""
        self._exposed(self.get(sandbox_id), port)

    def _exposed(self, sb: ManagedSandbox, port: int) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise PolicyError("port", f"must be a TCP port (1-65535), not {port!r}")
        if port in (sb.layout.http_proxy_port, sb.layout.socks_port):
            raise PolicyError("network.expose", f"port {port} is the sandbox's own egress proxy; it cannot be exposed")
        if port not in sb.policy.network.expose:
            exposed = ", ".join(map(str, sb.policy.network.expose)) or "none"
            raise PolicyError("network.expose", f"port {port} of sandbox {sb.id} is not exposed (exposed: "
                                                f"{exposed}); add it to the policy's network.expose")

    @contextlib.asynccontextmanager
    async def connect_port(self, sandbox_id: str, port: int, *, via: str) -> AsyncIterator[PortStream]:
        """One connection to ``port`` inside, for as long as the block runs; ``via`` names the front end
        in the audit record."""
        sb = self.get(sandbox_id)
        self._exposed(sb, port)
        stream = PortStream(sb.channel, port)
        started = time.monotonic()
        try:
            await stream.open()
        except Exception as exc:
            self._record(sb, "port.open", {"port": port, "via": via, "error": str(exc)[:300]})
            raise
        self._record(sb, "port.open", {"port": port, "via": via})
        sb.busy += 1  # an open connection is use: the sandbox does not idle out under it
        try:
            yield stream
        finally:
            sb.busy -= 1
            stream.close()
            sb.last_active = self.loop.time()
            self._record(sb, "port.close", {"port": port, "via": via, "bytes_in": stream.bytes_in,
                                            "bytes_out": stream.bytes_out,
                                            "seconds": round(time.monotonic() - started, 3)})

    async def forward_port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """A listener on the host's loopback that relays each connection to ``port`` inside; (host, port)
        to connect to. One per sandbox and port, closed when the sandbox ends."""
        sb = self.get(sandbox_id)
        self._exposed(sb, port)
        server = sb.forwards.get(port)
        if server is None:
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    async with self.connect_port(sandbox_id, port, via="forward") as stream:
                        await relay(stream, reader, writer)
                except Exception:  # nothing listens inside, the sandbox ended: the client sees the close
                    writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            sb.forwards[port] = server
        host, bound = server.sockets[0].getsockname()[:2]
        return host, bound
