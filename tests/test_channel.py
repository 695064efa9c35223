"""The host's end of the channel against a hostile agent: every bad frame is refused, pending calls fail
cleanly, and nothing the agent sends can grow host memory past the bounds."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from stockade.agent import protocol
from stockade.agent.ports import PORT_SEND_WINDOW, PORT_WINDOW
from stockade.errors import FilesystemError, ProtocolError, SandboxUnavailableError
from stockade.runtime.channel import AgentChannel, CommandPending, ReadPending
from stockade.runtime.port_stream import PortStream

from .waiting import async_wait_until


def prefix(size: int, head_len: int) -> bytes:
    return size.to_bytes(4, "big") + head_len.to_bytes(4, "big")


def frame(header: dict, body: bytes = b"") -> bytes:
    return protocol.encode(header, body)


async def pair():
    host, agent = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    closed: list[BaseException | None] = []
    channel = AgentChannel(reader, writer, on_close=closed.append)
    agent.setblocking(False)
    return channel, agent, closed


async def hostile(payload: bytes) -> tuple[BaseException, list]:
    channel, agent, closed = await pair()
    call = asyncio.ensure_future(channel.call({"op": "stat", "path": "x"}))
    await asyncio.sleep(0)
    await asyncio.get_running_loop().sock_sendall(agent, payload)
    with pytest.raises(Exception) as err:
        await asyncio.wait_for(call, 5)
    agent.close()
    return err.value, closed


@pytest.mark.parametrize("payload,message", [
    (prefix(protocol.MAX_FRAME + 1, 2) + b"{}", "exceeds"),
    (prefix(0xFFFFFFFF, 0), "exceeds"),
    (prefix(10, 500) + b"x" * 6, "out of bounds"),
    (prefix(14, 10) + b"not json!!", "not JSON"),
    (prefix(6, 2) + b"[]", "not a JSON object"),
    (prefix(8, 4) + b"\xff\xfe{}", "not UTF-8"),
    (frame({"id": 1, "ev": "pwned"}), "unknown event"),
    (frame({"id": "1", "ev": "ok"}), "request id"),
    (frame({"id": 1, "ev": "error", "code": 5, "message": "x"}), "invalid 'code'"),
    (frame({"id": 1, "ev": "ok"}, b"unexpected body"), "body"),
    (frame({"id": 1, "ev": "started", "pid": 3}), "does not expect"),
])
def test_hostile_frames_are_refused(payload, message):
    async def main():
        err, closed = await hostile(payload)
        return err, closed

    err, closed = asyncio.run(main())
    assert isinstance(err, ProtocolError | SandboxUnavailableError), repr(err)
    assert message in str(err), str(err)
    assert closed and closed[0] is not None


def test_deep_nesting_is_rejected_not_crashing():
    deep = b"[" * 200000 + b"]" * 200000
    head = b'{"id":1,"ev":"ok","x":' + deep + b"}"
    assert len(head) < protocol.MAX_HEADER

    async def main():
        channel, agent, closed = await pair()
        call = asyncio.ensure_future(channel.call({"op": "stat"}))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().sock_sendall(
            agent, prefix(len(head) + 4, len(head)) + head)
        with pytest.raises(ProtocolError, match="not JSON"):
            await asyncio.wait_for(call, 5)

    asyncio.run(main())


def test_output_beyond_the_cap_is_dropped_on_the_host():
    async def main():
        channel, agent, _ = await pair()
        pending = CommandPending(limit=1000)
        rid = channel.start({"op": "exec"}, pending)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(agent, frame({"id": rid, "ev": "started", "pid": 7}))
        chunk = b"A" * protocol.CHUNK
        for _ in range(64):  # 4 MiB claimed as output, against a 1000-byte cap the agent ignores
            await loop.sock_sendall(agent, frame({"id": rid, "ev": "stdout"}, chunk))
        await loop.sock_sendall(agent, frame({"id": rid, "ev": "exit", "code": 0, "signal": None,
                                              "timed_out": False, "truncated": {"stdout": False}}))
        result = await asyncio.wait_for(pending.done, 5)
        assert result["code"] == 0
        assert len(pending.output["stdout"]) == 1000 and pending.truncated["stdout"]

    asyncio.run(main())


def test_file_data_beyond_the_credit_window_is_a_violation():
    async def main():
        channel, agent, closed = await pair()
        pending = ReadPending()
        rid = channel.start({"op": "read", "path": "x"}, pending)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(agent, frame({"id": rid, "ev": "meta", "size": 1}))
        for _ in range(protocol.READ_WINDOW + 1):
            await loop.sock_sendall(agent, frame({"id": rid, "ev": "data"}, b"x" * 1024))
        await async_wait_until(lambda: closed, 5, "the channel to close on the chunk beyond the window")
        assert isinstance(closed[0], ProtocolError) and "beyond its credit" in str(closed[0]), repr(closed[0])
        # exactly the window was taken in; the chunk beyond it was not, and the read ends in the error
        queued = [pending.chunks.get_nowait() for _ in range(pending.chunks.qsize())]
        assert queued[:-1] == [b"x" * 1024] * protocol.READ_WINDOW, len(queued)
        assert isinstance(queued[-1], ProtocolError)

    asyncio.run(main())


async def opening_port():
    """A port connection whose port_open the fake agent has been sent (and not yet answered)."""
    channel, agent, closed = await pair()
    stream = PortStream(channel, 8000)
    opening = asyncio.ensure_future(stream.open())
    await asyncio.sleep(0)
    return channel, agent, closed, stream, opening


@pytest.mark.parametrize("frames,message", [
    # data before the connection opened, past the credit window, after the server's end; acknowledgements
    # of bytes never sent; a close before the open
    ([{"ev": "data", "body": b"x"}], "out of order"),
    ([{"ev": "ok"}] + [{"ev": "data", "body": b"x"}] * (PORT_WINDOW + 1), "beyond its credit"),
    ([{"ev": "ok"}, {"ev": "eof"}, {"ev": "data", "body": b"x"}], "out of order"),
    ([{"ev": "ok"}, {"ev": "sent", "n": 1}], "never sent"),
    ([{"ev": "ok"}, {"ev": "sent", "n": 0}], "never sent"),
    ([{"ev": "ok"}, {"ev": "sent", "n": -5}], "never sent"),
    ([{"ev": "closed"}], "out of order"),
    ([{"ev": "ok"}, {"ev": "ok"}], "out of order"),
])
def test_a_port_connection_refuses_what_the_host_did_not_allow(frames, message):
    async def main():
        channel, agent, closed, stream, opening = await opening_port()
        loop = asyncio.get_running_loop()
        for f in frames:
            f = dict(f)
            body = f.pop("body", b"")
            await loop.sock_sendall(agent, frame({"id": stream.rid, **f}, body))
        await async_wait_until(lambda: closed, 5, "the channel to close on the violation")
        assert isinstance(closed[0], ProtocolError) and message in str(closed[0]), repr(closed[0])
        await asyncio.gather(opening, return_exceptions=True)
        # a reader ends (at an end of stream that came first, or with the error) and a writer fails,
        # instead of hanging (wait_for's TimeoutError would fail the test)
        with contextlib.suppress(ProtocolError, ConnectionResetError):
            while await asyncio.wait_for(stream.read(), 5):
                pass
        with pytest.raises((ProtocolError, ConnectionResetError, SandboxUnavailableError)):
            await asyncio.wait_for(stream.write(b"x"), 5)
        agent.close()

    asyncio.run(main())


def test_a_port_writer_waits_for_the_agents_acknowledgements():
    async def main():
        channel, agent, closed, stream, opening = await opening_port()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(agent, frame({"id": stream.rid, "ev": "ok"}))
        await opening
        received = bytearray()

        async def take_in() -> None:  # the agent reads what the host sends
            while data := await loop.sock_recv(agent, 1 << 20):
                received.extend(data)

        reading = asyncio.ensure_future(take_in())
        writing = asyncio.ensure_future(stream.write(b"y" * (PORT_SEND_WINDOW + 100_000)))
        await async_wait_until(lambda: stream.pending.unacked, 5, "the first window to go out")
        await asyncio.sleep(0.2)
        assert not writing.done() and stream.pending.unacked <= PORT_SEND_WINDOW  # held at the window
        await loop.sock_sendall(agent, frame({"id": stream.rid, "ev": "sent", "n": stream.pending.unacked}))
        await asyncio.wait_for(writing, 5)
        assert stream.bytes_out == PORT_SEND_WINDOW + 100_000 and not closed
        await async_wait_until(lambda: received.count(b"y") == PORT_SEND_WINDOW + 100_000, 5, "every byte")
        stream.close()
        reading.cancel()
        agent.close()

    asyncio.run(main())


def test_unsolicited_frames_are_ignored_and_errors_are_typed():
    async def main():
        channel, agent, closed = await pair()
        loop = asyncio.get_running_loop()
        call = asyncio.ensure_future(channel.call({"op": "stat"}))
        await asyncio.sleep(0)
        await loop.sock_sendall(agent, frame({"id": 999, "ev": "ok"}))  # nobody asked: dropped
        await loop.sock_sendall(agent, frame({"id": 1, "ev": "error", "code": "EACCES", "message": "no"}))
        with pytest.raises(FilesystemError) as err:
            await call
        assert err.value.errno_name == "EACCES"
        assert not closed
        agent.close()  # the agent vanishes: pending and future calls fail, the host carries on
        await async_wait_until(lambda: channel.closed, 5, "the channel to see the agent gone")
        with pytest.raises(SandboxUnavailableError):
            await channel.call({"op": "stat"})

    asyncio.run(main())


def test_silent_agent_times_out():
    async def main():
        channel, agent, _ = await pair()
        with pytest.raises(TimeoutError, match="did not answer"):  # the builtin catches stockade's
            await channel.call({"op": "stat"}, timeout=0.2)
        agent.close()

    asyncio.run(main())
