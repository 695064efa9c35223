"""The host's end of the agent channel. Everything arriving here is untrusted.

Frames are size-checked before they are read, headers must be JSON objects of the expected shape, and
every frame must answer a request the host made. Command output is kept only up to the policy's cap
and file reads flow under a credit window, so a hostile or broken agent can neither crash nor
exhaust the host: on any violation the channel closes, pending calls fail with ProtocolError, and
the owner kills the sandbox.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, cast

from .. import errors
from ..agent import protocol
from ..agent.ports import PORT_WINDOW
from ..errors import ProtocolError, SandboxUnavailableError, filesystem_error

Header = dict[str, Any]

# ev -> required fields and their types. Anything else from the agent is a protocol violation.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"v": int, "pid": int},
    "started": {"pid": int},
    "stdout": {},
    "stderr": {},
    "exit": {"code": (int, type(None)), "signal": (int, type(None)), "timed_out": bool, "truncated": dict},
    "error": {"code": str, "message": str},
    "ok": {},
    "result": {},
    "meta": {"size": int},
    "data": {},
    "end": {},
    "done": {"size": int},
    "cell": {"more": bool},
    "artifact": {"aid": int, "more": bool},
    "cell_done": {"execution_count": int, "timed_out": bool, "restarted": bool, "truncated": dict},
    "sent": {"n": int},
    "eof": {},
    "closed": {},
}


def validate(header: Header, body: bytes) -> None:
    ev = header.get("ev")
    if not isinstance(ev, str) or ev not in _SCHEMA:
        raise ProtocolError(f"agent sent an unknown event {str(ev)[:40]!r}")
    rid = header.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("agent sent a frame without a request id")
    for name, kind in _SCHEMA[ev].items():
        value = header.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ProtocolError(f"agent sent {ev!r} with an invalid {name!r}")
    if body and ev not in ("stdout", "stderr", "data", "cell", "artifact"):
        raise ProtocolError(f"agent sent a body with {ev!r}")


class Pending:
    """One request in flight. ``feed`` returns True once the request is complete."""

    def __init__(self) -> None:
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def feed(self, header: Header, body: bytes) -> bool:
        ev = header["ev"]
        if ev == "error":
            self.fail(filesystem_error(header["code"], header["message"][:1000]))
            return True
        if ev in ("ok", "result", "done", "ready"):
            if not self.done.done():
                self.done.set_result(header)
            return True
        raise ProtocolError(f"agent sent {ev!r} for a request that does not expect it")

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # mark retrieved: a caller may already have gone


class CommandPending(Pending):
    """A process: its pid, output kept up to ``limit`` bytes per stream, then its exit."""

    def __init__(self, limit: int, on_output: Callable[[str, bytes], None] | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.on_output = on_output
        self.started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.output = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = {"stdout": False, "stderr": False}

    def feed(self, header: Header, body: bytes) -> bool:
        ev = header["ev"]
        if ev == "started":
            if self.started.done():
                raise ProtocolError("agent reported a process start twice")
            self.started.set_result(header["pid"])
            return False
        if ev in ("stdout", "stderr"):
            if not self.started.done():
                raise ProtocolError("agent sent output before the process started")
            buf = self.output[ev]
            room = self.limit - len(buf)
            if len(body) > room:  # the host enforces the cap whatever the agent claims
                self.truncated[ev] = True
                body = body[:max(room, 0)]
            if body:
                buf += body
                if self.on_output:
                    self.on_output(ev, body)
            return False
        if ev == "exit":
            for stream in ("stdout", "stderr"):
                if header["truncated"].get(stream) is True:
                    self.truncated[stream] = True
            if not self.started.done():
                self.started.set_exception(ProtocolError("agent reported an exit before a start"))
                self.started.exception()
            if not self.done.done():
                self.done.set_result(header)
            return True
        if ev == "error":
            err = filesystem_error(header["code"], header["message"][:1000])
            if not self.started.done():
                self.started.set_exception(err)
                self.started.exception()
            self.fail(err)
            return True
        raise ProtocolError(f"agent sent {ev!r} for a process")

    def fail(self, exc: BaseException) -> None:
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()
        super().fail(exc)


class CellPending(CommandPending):
    """A code cell (or a context's start): output as for a command, plus the interpreter's events, each
    a JSON object reassembled from ``cell`` frames. Events are bounded in size and number."""

    MAX_EVENT = 32 << 20
    MAX_EVENTS = 10000

    def __init__(self, limit: int, on_output: Callable[[str, bytes], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(limit, on_output)
        self.started.set_result(0)  # output may come at once: there is no separate start
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self._partial = bytearray()

    def feed(self, header: Header, body: bytes) -> bool:
        ev = header["ev"]
        if ev in ("stdout", "stderr"):
            return super().feed(header, body)
        if ev == "cell":
            if len(self._partial) + len(body) <= self.MAX_EVENT:
                self._partial += body
            else:
                self._partial = bytearray(b"null")  # too large: dropped below
            if not header["more"]:
                self._event(bytes(self._partial))
                self._partial = bytearray()
            return False
        if ev in ("cell_done", "result"):
            if not self.done.done():
                self.done.set_result(header)
            return True
        if ev == "error":
            self.fail(filesystem_error(header["code"], header["message"][:1000]))
            return True
        raise ProtocolError(f"agent sent {ev!r} for a code cell")

    def _event(self, raw: bytes) -> None:
        try:
            event = protocol.loads(raw.decode("utf-8", "replace"))
        except protocol.FrameError:
            return  # the interpreter is user code: a garbled event is dropped, not a protocol violation
        if isinstance(event, dict) and isinstance(event.get("type"), str) and len(self.events) < self.MAX_EVENTS:
            self.events.append(event)
            if self.on_event:
                self.on_event(event)


class StreamPending(Pending):
    """A standing request whose frames go to ``on_frame`` as they come; it ends with the channel."""

    def __init__(self, on_frame: Callable[[Header, bytes], None], events: tuple[str, ...]) -> None:
        super().__init__()
        self.on_frame, self.events = on_frame, events

    def feed(self, header: Header, body: bytes) -> bool:
        if header["ev"] not in self.events:
            raise ProtocolError(f"agent sent {header['ev']!r} on a stream of {self.events}")
        self.on_frame(header, body)
        return False


class ReadPending(Pending):
    """A streamed file read under a credit window: the agent may run at most READ_WINDOW chunks ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.outstanding = protocol.READ_WINDOW
        self.size: int | None = None

    def feed(self, header: Header, body: bytes) -> bool:
        ev = header["ev"]
        if ev == "meta" and self.size is None:
            self.size = header["size"]
            if not self.done.done():
                self.done.set_result(header)
            return False
        if ev == "data" and self.size is not None:
            self.outstanding -= 1
            if self.outstanding < 0:
                raise ProtocolError("agent sent file data beyond its credit")
            self.chunks.put_nowait(body)
            return False
        if ev == "end" and self.size is not None:
            self.chunks.put_nowait(None)
            return True
        if ev == "error":
            err = filesystem_error(header["code"], header["message"][:1000])
            self.fail(err)
            return True
        raise ProtocolError(f"agent sent {ev!r} out of order for a file read")

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.chunks.put_nowait(exc)


class PortPending(Pending):
    """A connection to a port inside (agent/ports.py): ``done`` resolves when it is open; the server's bytes
    arrive under the host's credit (at most PORT_WINDOW chunks ahead), and the agent acknowledges the
    bytes it wrote (``sent``), at most PORT_SEND_WINDOW of which may be outstanding."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.outstanding = PORT_WINDOW
        self.unacked = 0                       # bytes sent to the agent it has not yet written
        self.acked = asyncio.Event()           # set whenever the agent acknowledges some
        self.ended = False                     # the agent sent "closed" (or an error)
        self.eof = False

    def feed(self, header: Header, body: bytes) -> bool:
        ev = header["ev"]
        opened = self.done.done() and self.done.exception() is None
        if ev == "ok" and not self.done.done():
            self.done.set_result(header)
            return False
        if ev == "data" and opened and not self.eof:
            self.outstanding -= 1
            if self.outstanding < 0:
                raise ProtocolError("agent sent port data beyond its credit")
            self.chunks.put_nowait(body)
            return False
        if ev == "sent" and opened:
            if not 0 < header["n"] <= self.unacked:
                raise ProtocolError("agent acknowledged port bytes the host never sent")
            self.unacked -= header["n"]
            self.acked.set()
            return False
        if ev == "eof" and opened and not self.eof:
            self.eof = True
            self.chunks.put_nowait(None)
            return False
        if ev == "closed" and opened:
            self._finish()
            return True
        if ev == "error":
            self.fail(filesystem_error(header["code"], header["message"][:1000]))
            return True
        raise ProtocolError(f"agent sent {ev!r} out of order for a port connection")

    def _finish(self) -> None:
        self.ended = True
        if not self.eof:
            self.eof = True
            self.chunks.put_nowait(None)
        self.acked.set()

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.ended = True
        if not self.eof:
            self.eof = True
            self.chunks.put_nowait(exc)
        self.acked.set()


class AgentChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_close: Callable[[BaseException | None], Awaitable[None] | None] | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._closed: BaseException | None = None
        self.on_close = on_close
        # the runtime's account of why its sandbox ended, asked when the agent's end closes (e.g. gVisor:
        # the out-of-memory kill of the Sentry ends the whole sandbox)
        self.explain_end: Callable[[], str | None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def next_id(self) -> int:
        return next(self._ids)

    async def _read_loop(self) -> None:
        reason: BaseException | None = None
        try:
            while True:
                prefix = await self._reader.readexactly(protocol.PREFIX_SIZE)
                rest, head_len = protocol.parse_prefix(prefix)
                data = await self._reader.readexactly(rest)
                header = protocol.decode_header(data[:head_len])
                body = data[head_len:]
                validate(header, body)
                rid = cast(int, header["id"])  # validate() checked it is an int
                pending = self._pending.get(rid)
                if pending is None:
                    continue  # a late answer to a request the host gave up on
                if pending.feed(header, body):
                    del self._pending[rid]
        except asyncio.IncompleteReadError:
            why = self.explain_end() if self.explain_end is not None else None
            reason = SandboxUnavailableError(f"the sandbox ended: {why}" if why else
                                             "the sandbox's agent closed its channel (the sandbox ended)")
        except (protocol.FrameError, ProtocolError) as exc:
            reason = ProtocolError(f"sandbox agent violated the protocol: {exc}")
        except (ConnectionError, OSError) as exc:
            reason = SandboxUnavailableError(f"lost the sandbox's agent channel: {exc}")
        except asyncio.CancelledError:
            reason = SandboxUnavailableError("the sandbox was stopped")
        except Exception as exc:  # never let a hostile frame take the host down
            reason = ProtocolError(f"sandbox agent sent a frame the host could not process: {exc!r}")
        self._shutdown(reason)
        if self.on_close is not None:
            result = self.on_close(reason)
            if asyncio.iscoroutine(result):
                # its own task: the owner's clean-up closes this channel, which cancels this reader task
                self._closing = asyncio.get_running_loop().create_task(result)

    def _shutdown(self, reason: BaseException) -> None:
        if self._closed is None:
            self._closed = reason
        for pending in self._pending.values():
            pending.fail(reason)
        self._pending.clear()
        self._writer.close()

    def close(self) -> None:
        self._shutdown(SandboxUnavailableError("the sandbox was stopped"))
        self._task.cancel()

    def send(self, header: Header, body: bytes = b"") -> None:
        if self._closed is not None:
            raise self._closed
        self._writer.write(protocol.encode(header, body))

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise SandboxUnavailableError(f"lost the sandbox's agent channel: {exc}") from None

    def start(self, header: Header, pending: Pending, body: bytes = b"") -> int:
        """Register ``pending`` and send the request; returns its id."""
        if self._closed is not None:
            raise self._closed
        rid = self.next_id()
        header = {**header, "id": rid}
        self._pending[rid] = pending
        self.send(header, body)
        return rid

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    async def call(self, header: Header, body: bytes = b"", timeout: float | None = 30.0) -> Header:
        pending = Pending()
        rid = self.start(header, pending, body)
        try:
            result: Header = await asyncio.wait_for(asyncio.shield(pending.done), timeout)
            return result
        except TimeoutError:
            self.forget(rid)
            raise errors.TimeoutError(f"the sandbox's agent did not answer {header.get('op')!r} within {timeout}s") \
                from None
