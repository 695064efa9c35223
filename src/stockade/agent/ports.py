"""Ports: the host reaches a TCP port a process listens on inside the sandbox (a dev server, say).

The agent connects to 127.0.0.1:PORT (then [::1]:PORT, where servers that bind "localhost" often end up)
and relays the bytes over the channel, in the same poll loop as everything else: the same for every
runtime, with no socket of the host's inside the sandbox and no route from outside into its network.
Which ports may be reached is the host's decision (policy ``network.expose``); the agent relays what the
host opens. Both directions flow under windows, so a slow reader on either side holds only its own
connection: the agent sends at most PORT_WINDOW chunks ahead of the host's credit, and buffers at most
PORT_SEND_WINDOW bytes the host sent before it acknowledged them written ("sent").

Frames, all with the id of the ``port_open`` request: host -> agent ``port_send`` (body), ``port_credit``
(n), ``port_shut`` (the host's client sent its end), ``port_close`` (abort); agent -> host ``ok`` (open),
``data`` (body), ``sent`` (n), ``eof`` (the server sent its end), ``closed`` (the last frame), ``error``.
"""

from __future__ import annotations

import errno
import select
from time import monotonic as _monotonic

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    import _socket

try:
    from . import protocol
    from .common import AgentBase
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]
    from common import AgentBase  # type: ignore[no-redef]

PORT_WINDOW = 16                 # data chunks the agent may send ahead of the host's credit
PORT_SEND_WINDOW = 1 << 20       # bytes from the host buffered here before they are acknowledged
MAX_PORT_CONNS = 256             # open at once per sandbox
CONNECT_TIME = 5.0               # seconds a connect may take (a full listen backlog drops SYNs)
# AF_INET, AF_INET6 (Linux's numbers): _socket is imported at the first port_open, not at every cold start
_ADDRESSES = ((2, "127.0.0.1"), (10, "::1"))


class PortConn:
    __slots__ = ("rid", "port", "sock", "fd", "family", "connecting", "deadline", "credit", "wbuf", "reading",
                 "shut", "watched")

    def __init__(self, rid: int, port: int) -> None:
        self.rid, self.port = rid, port
        self.sock: _socket.socket = None  # type: ignore[assignment]  # set by the first connect
        self.fd = -1
        self.family = 0                  # the index in _ADDRESSES being tried
        self.connecting = True
        self.deadline = 0.0
        self.credit = PORT_WINDOW
        self.wbuf = bytearray()          # from the host, not yet written to the server
        self.reading = True              # the server has not sent its end
        self.shut = False                # the host's client sent its end (passed on once wbuf is empty)
        self.watched = 0                 # the poll mask registered for fd


class Ports(AgentBase):
    def op_port_open(self, rid: int, h: dict, body: bytes) -> None:
        port = h["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, not {port!r}")
        if len(self.ports) >= MAX_PORT_CONNS:
            self.error(rid, "EMFILE", f"{MAX_PORT_CONNS} connections to the sandbox's ports are open already")
            return
        conn = PortConn(rid, port)
        self.ports[rid] = conn
        self.port_connect(conn)

    def port_connect(self, conn: PortConn) -> None:
        """Start a non-blocking connect to the next loopback address; the loop sees it complete."""
        import _socket

        family, host = _ADDRESSES[conn.family]
        sock = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
        conn.sock, conn.fd, conn.connecting = sock, sock.fileno(), True
        conn.deadline = _monotonic() + CONNECT_TIME
        self.port_fds[conn.fd] = conn
        code = sock.connect_ex((host, conn.port))
        if code not in (0, errno.EINPROGRESS):
            self.port_connected(conn, code)
            return
        self.port_watch(conn)

    def port_connected(self, conn: PortConn, code: int) -> None:
        import _socket

        if code == 0:
            conn.connecting = False
            try:
                conn.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.send({"id": conn.rid, "ev": "ok"})
            self.port_write(conn)
            return
        self.port_unwatch(conn)
        conn.sock.close()
        if code in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENETUNREACH) \
                and conn.family + 1 < len(_ADDRESSES):
            conn.family += 1
            self.port_connect(conn)
            return
        del self.ports[conn.rid]
        name = errno.errorcode.get(code, "EIO")
        if code == errno.ECONNREFUSED:
            message = f"nothing inside the sandbox listens on port {conn.port} (127.0.0.1 or ::1)"
        else:
            message = f"could not connect to port {conn.port} inside the sandbox: {name}"
        self.error(conn.rid, name, message)

    def port_ready(self, conn: PortConn, ev: int) -> None:
        import _socket

        if conn.connecting:
            self.port_connected(conn, conn.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR))
            return
        if ev & select.POLLOUT:
            self.port_write(conn)
        if conn.rid in self.ports and ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and conn.reading:
            self.port_read(conn)
        elif conn.rid in self.ports and ev & (select.POLLHUP | select.POLLERR) and not conn.wbuf:
            self.port_end(conn)  # nothing to read or write any more: POLLHUP would only repeat

    def port_read(self, conn: PortConn) -> None:
        try:
            data = conn.sock.recv(protocol.CHUNK)
        except BlockingIOError:
            return
        except OSError:  # a reset: what arrived before it was passed on
            self.port_end(conn)
            return
        if not data:
            conn.reading = False
            self.send({"id": conn.rid, "ev": "eof"})
            if conn.shut and not conn.wbuf:
                self.port_end(conn)
                return
        else:
            conn.credit -= 1
            self.send({"id": conn.rid, "ev": "data"}, data)
        self.port_watch(conn)

    def port_write(self, conn: PortConn) -> None:
        written = 0
        while conn.wbuf:
            try:
                n = conn.sock.send(conn.wbuf)
            except BlockingIOError:
                break
            except OSError:  # the server went away: what it did send still reaches the host
                conn.wbuf.clear()
                conn.shut = True
                if not conn.reading:
                    self.port_end(conn)
                    return
                break
            del conn.wbuf[:n]
            written += n
        if written:
            self.send({"id": conn.rid, "ev": "sent", "n": written})
        if conn.shut and not conn.wbuf:
            if not conn.reading:
                self.port_end(conn)
                return
            try:
                conn.sock.shutdown(1)  # SHUT_WR
            except OSError:
                pass
        self.port_watch(conn)

    def port_end(self, conn: PortConn) -> None:
        """The connection is over: close it, and tell the host with its last frame."""
        self.port_unwatch(conn)
        conn.sock.close()
        if self.ports.pop(conn.rid, None) is not None:
            self.send({"id": conn.rid, "ev": "closed"})

    def port_watch(self, conn: PortConn) -> None:
        if conn.connecting:
            mask = select.POLLOUT
        else:
            mask = select.POLLIN if conn.reading and conn.credit > 0 and not self.paused else 0
            if conn.wbuf:
                mask |= select.POLLOUT
        if mask == conn.watched:
            return
        if mask:
            self.poll.register(conn.fd, mask)
        else:
            self.poll.unregister(conn.fd)
        conn.watched = mask

    def port_unwatch(self, conn: PortConn) -> None:
        if conn.watched:
            self.poll.unregister(conn.fd)
            conn.watched = 0
        self.port_fds.pop(conn.fd, None)

    def port_conn(self, rid: int) -> PortConn | None:
        conn = self.ports.get(rid)
        return None if conn is None or conn.connecting else conn

    def op_port_send(self, rid: int, h: dict, body: bytes) -> None:
        conn = self.port_conn(rid)
        if conn is None or conn.shut:
            return  # it ended meanwhile: the host has its "closed" or "error" on the way
        if len(conn.wbuf) + len(body) > PORT_SEND_WINDOW:
            self.port_end(conn)
            self.error(rid, "ENOBUFS", "the host sent past its window")
            return
        conn.wbuf += body
        self.port_write(conn)

    def op_port_credit(self, rid: int, h: dict, body: bytes) -> None:
        conn = self.port_conn(rid)
        if conn is not None:
            conn.credit += int(h["n"])
            self.port_watch(conn)

    def op_port_shut(self, rid: int, h: dict, body: bytes) -> None:
        conn = self.port_conn(rid)
        if conn is not None:
            conn.shut = True
            self.port_write(conn)

    def op_port_close(self, rid: int, h: dict, body: bytes) -> None:
        conn = self.ports.get(rid)
        if conn is not None:
            self.port_end(conn)

    def port_deadlines(self, now: float) -> None:
        for conn in [c for c in self.ports.values() if c.connecting and now >= c.deadline]:
            self.port_unwatch(conn)
            conn.sock.close()
            del self.ports[conn.rid]
            self.error(conn.rid, "ETIMEDOUT", f"port {conn.port} inside the sandbox did not accept a connection "
                                              f"within {CONNECT_TIME:g} s")
