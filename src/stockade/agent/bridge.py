"""The network bridge: proxy ports that hand connections to the broker, or answer that the network is off."""

from __future__ import annotations

import select
import sys
from time import monotonic as _monotonic
from time import sleep as _sleep

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    from collections.abc import Callable

try:
    from .common import AgentBase
except ImportError:  # run as a script inside the sandbox
    from common import AgentBase  # type: ignore[no-redef]



class Bridge(AgentBase):
    def op_net_bridge(self, rid: int, h: dict, body: bytes) -> None:
        """Listen on loopback ports inside the sandbox; an accept thread per port passes each connection
        to the host's broker, so the agent's loop never waits on the network."""
        serve = _bridge_relay if h.get("relay") else _bridge_accept
        self.serve_proxy_ports(h, serve, h["broker"])
        self.send({"id": rid, "ev": "ok"})

    def op_net_off(self, rid: int, h: dict, body: bytes) -> None:
        """network.mode = none: the proxy ports still listen, and every request gets at once an answer
        that says the network is off and which field opens it (curl, pip, git, node and Python clients
        read the proxy variables; without this they retry name lookups and time out, saying nothing).
        One thread per port polls all its connections (_refuse_network)."""
        if not self.network_off:  # a warm sandbox is told again at claim
            self.serve_proxy_ports(h, _refuse_network)
            self.network_off = True
        self.send({"id": rid, "ev": "ok"})

    def serve_proxy_ports(self, h: dict, serve: Callable[..., None], *args: object) -> None:
        """A loopback listener on the HTTP proxy and the SOCKS5 port, each served by ``serve(listener,
        kind, *args)`` on a thread of its own (kind: b"H" or b"S")."""
        import _socket
        import _thread

        for port, kind in ((int(h["http_port"]), b"H"), (int(h["socks_port"]), b"S")):
            listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            _thread.start_new_thread(serve, (listener, kind, *args))
            self.threads += 1


def _bridge_accept(listener, kind, broker):  # noqa: ANN001
    """Accept connections on a loopback port and hand each one, as a descriptor, to the host's broker:
    the bytes then flow between the client and the broker directly, never through the agent."""
    import _socket

    while True:
        try:
            fd, _ = listener._accept()
        except OSError:  # out of descriptors, say: back off instead of spinning
            _sleep(0.05)
            continue
        client = _socket.socket(fileno=fd)
        upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)  # small records must not wait
            upstream.connect(broker)
            upstream.sendmsg([kind], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
        except OSError:
            pass
        finally:  # the broker holds its own copy now
            upstream.close()
            client.close()


RELAY_CHUNK = 65536


def _bridge_relay(listener, kind, broker):  # noqa: ANN001
    """For a runtime whose kernel cannot hand a descriptor to the host (gVisor's sockets live in its own
    kernel): each connection gets a stream of its own to the broker, the selector byte first, and two
    threads copy the bytes, each passing on its side's end of stream as a half-close."""
    import _socket
    import _thread

    def pump(src, dst):  # noqa: ANN001, ANN202
        while True:
            try:
                data = src.recv(RELAY_CHUNK)
            except OSError:  # a reset reads as the end: what arrived before it has been passed on
                data = b""
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:  # nothing more can reach dst: stop both directions
                for sock in (src, dst):
                    try:
                        sock.shutdown(_socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
        try:
            dst.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    def serve(client):  # noqa: ANN001, ANN202
        upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            upstream.connect(broker)
            upstream.sendall(kind)
        except OSError:
            upstream.close()
            client.close()
            return
        done = _thread.allocate_lock()
        done.acquire()

        def back():  # noqa: ANN202
            pump(upstream, client)
            done.release()

        _thread.start_new_thread(back, ())
        pump(client, upstream)
        done.acquire()
        upstream.close()
        client.close()

    while True:
        try:
            fd, _ = listener._accept()
        except OSError:
            _sleep(0.05)
            continue
        client = _socket.socket(fileno=fd)
        try:
            _thread.start_new_thread(serve, (client,))
        except RuntimeError:  # no thread to be had: the client is refused, not left hanging
            client.close()


NETWORK_OFF = "stockade: network is off for this sandbox (network.mode = none); network.mode = allowlist opens it"
_NETWORK_OFF_REPLY = (f"HTTP/1.1 403 {NETWORK_OFF}\r\nX-Stockade-Reason: {NETWORK_OFF}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: {len(NETWORK_OFF) + 1}\r\n"
                      f"Connection: close\r\n\r\n{NETWORK_OFF}\n").encode()


REFUSER_CONNECTIONS = 128   # open at once per port; past it the oldest is closed
REFUSER_HEAD_TIME = 1.0     # seconds a client may take to send a first byte (then it is answered anyway)
REFUSER_DRAIN_TIME = 0.5    # after the answer: read what is left, so the close is not a reset


def _refuse_network(listener, kind):  # noqa: ANN001
    """Answer every connection on a proxy port with the refusal: HTTP gets the 403 once its request
    starts (or after REFUSER_HEAD_TIME), SOCKS5 its 'not allowed by ruleset' reply. One thread polls all
    of a port's connections, each with a deadline, so hostile clients (silent, trickling, flooding,
    hundreds at once) delay no one and make the agent start no threads."""
    import _socket

    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    conns: dict = {}  # fd -> [socket, stage, deadline]; stages: 0 head/greeting, 1 SOCKS request, 2 draining

    def close(fd):  # noqa: ANN001, ANN202
        poller.unregister(fd)
        conns.pop(fd)[0].close()

    def answer(fd, conn, reply):  # noqa: ANN001, ANN202
        try:
            conn.send(reply)  # a few hundred bytes: the socket's buffer takes them whole
            conn.shutdown(_socket.SHUT_WR)
        except OSError:
            close(fd)
            return
        conns[fd][1:] = [2, _monotonic() + REFUSER_DRAIN_TIME]

    while True:
        now = _monotonic()
        for fd in [fd for fd, c in conns.items() if c[2] <= now]:
            conn, stage, _ = conns[fd]
            if stage == 0 and kind == b"H":  # a head that never completed still gets the reason
                answer(fd, conn, _NETWORK_OFF_REPLY)
            else:
                close(fd)
        wait = min((c[2] for c in conns.values()), default=now + 60) - now
        for fd, _ in poller.poll(max(0, int(wait * 1000)) + 1):
            if fd == listener.fileno():
                while True:
                    try:
                        cfd, _ = listener._accept()
                    except OSError:  # nothing more to accept now (or out of descriptors)
                        break
                    if len(conns) >= REFUSER_CONNECTIONS:
                        close(next(iter(conns)))
                    conn = _socket.socket(fileno=cfd)
                    conn.setblocking(False)
                    conns[cfd] = [conn, 0, _monotonic() + REFUSER_HEAD_TIME]
                    poller.register(cfd, select.POLLIN)
                continue
            entry = conns.get(fd)
            if entry is None:
                continue
            conn, stage, _ = entry
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
            elif stage == 2:
                continue  # draining
            elif kind == b"S":
                if stage == 0:  # greeting: answer "no authentication", then wait for the request
                    try:
                        conn.send(b"\x05\x00")
                    except OSError:
                        close(fd)
                        continue
                    entry[1] = 1
                else:  # the request: 0x02, connection not allowed by ruleset
                    answer(fd, conn, b"\x05\x02\x00\x01" + bytes(6))
            else:  # the first bytes of a request: the answer does not depend on the rest (drained after)
                answer(fd, conn, _NETWORK_OFF_REPLY)
