"""The host's end of one connection to a TCP port inside a sandbox, carried over the agent's channel.

A byte stream (read, write, write_eof, close) under the channel's windows: the same for every runtime,
since only the channel crosses the boundary. ``relay`` joins it to an asyncio stream (a client's TCP
connection), each direction passing on the other's end.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..agent import protocol
from ..agent.ports import CONNECT_TIME, PORT_SEND_WINDOW
from ..errors import SandboxUnavailableError
from .channel import AgentChannel, PortPending


class PortStream:
    def __init__(self, channel: AgentChannel, port: int) -> None:
        self.channel, self.port = channel, port
        self.pending = PortPending()
        self.rid = 0
        self.bytes_in = 0      # from the server inside to the host
        self.bytes_out = 0     # from the host to the server inside
        self._eof_seen = False
        self._closed = False

    async def open(self) -> PortStream:
        """Connect to the port inside; the agent's error (nothing listens, say) is raised as it came."""
        self.rid = self.channel.start({"op": "port_open", "port": self.port}, self.pending)
        try:
            await asyncio.wait_for(asyncio.shield(self.pending.done), CONNECT_TIME + 5)
        except BaseException:
            self.close()
            raise
        return self

    async def read(self) -> bytes:
        """The next bytes the server sent; b"" once it sent its end (or the connection ended)."""
        if self._eof_seen:
            return b""
        chunk = await self.pending.chunks.get()
        if isinstance(chunk, BaseException):
            self._eof_seen = True
            raise chunk
        if chunk is None:
            self._eof_seen = True
            return b""
        self.bytes_in += len(chunk)
        if not self.pending.ended:
            self.pending.outstanding += 1
            self.channel.send({"op": "port_credit", "id": self.rid, "n": 1})
        return chunk

    async def write(self, data: bytes) -> None:
        """Pass bytes to the server, waiting while the agent holds a window's worth unwritten."""
        view = memoryview(data)
        while view:
            piece = view[:protocol.CHUNK]
            while self.pending.unacked + len(piece) > PORT_SEND_WINDOW and not self.pending.ended:
                self.pending.acked.clear()
                await self.pending.acked.wait()
            if self.pending.ended or self._closed:
                raise ConnectionResetError(f"the connection to port {self.port} inside the sandbox ended")
            self.pending.unacked += len(piece)
            self.channel.send({"op": "port_send", "id": self.rid}, bytes(piece))
            self.bytes_out += len(piece)
            view = view[len(piece):]
            await self.channel.drain()

    def write_eof(self) -> None:
        """The client sent its end: the server gets it once what came before is written."""
        if not self.pending.ended and not self._closed:
            self.channel.send({"op": "port_shut", "id": self.rid})

    def close(self) -> None:
        """End the connection now (idempotent); what is in flight is dropped."""
        if self._closed:
            return
        self._closed = True
        if self.rid and not self.pending.ended and not self.channel.closed:
            with contextlib.suppress(SandboxUnavailableError):
                self.channel.send({"op": "port_close", "id": self.rid})
        if self.rid:
            self.channel.forget(self.rid)
        self.pending.fail(ConnectionResetError(f"the connection to port {self.port} was closed"))


async def relay(stream: PortStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes both ways between a client's connection and a port inside until both ends are sent;
    a failure on either side ends both. Closes both when done."""

    async def inward() -> None:
        while data := await reader.read(protocol.CHUNK):
            await stream.write(data)
        stream.write_eof()

    async def outward() -> None:
        while data := await stream.read():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.ensure_future(inward()), asyncio.ensure_future(outward())]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stream.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
