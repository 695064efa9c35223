"""Inbound: a port inside the sandbox (``network.expose``) reached from outside, through the agent's relay.
Locally through ``get_host`` (a loopback listener on the host), remotely through the server's HTTP route
``/sandboxes/{id}/ports/{port}/``. Off by default; every connection audited; credentials never pass in."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto import events as wsevents

from stockade import PolicyError, Sandbox, StockadeError
from stockade.sdk.portal import portal
from stockade.sdk.transports.remote import RemoteTransport

from ..waiting import wait_until

ECHO, HTTP, SILENT = 8000, 8001, 8002

# Inside the sandbox: a TCP echo server (it passes on the client's end of stream as its own) on ECHO, an
# HTTP server on HTTP that answers with what it saw, and a listener on SILENT that accepts and never speaks.
SERVERS = r'''
import hashlib, http.server, json, socket, sys, threading

def echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)

def tcp(port, family, host):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(5):
                self.wfile.write(f"data: {i}\n\n".encode())
                self.wfile.flush()
            self.close_connection = True
            return
        out = json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body_sha": hashlib.sha256(body).hexdigest(), "body_len": len(body)}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Inside", "yes")
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a):
        pass

family, host = (socket.AF_INET6, "::1") if sys.argv[1:] == ["v6"] else (socket.AF_INET, "127.0.0.1")
threading.Thread(target=tcp, args=(8000, family, host), daemon=True).start()
silent = socket.socket(family)
silent.bind((host, 8002))
silent.listen(8)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 8001), Handler)
print("ready", flush=True)
server.serve_forever()
'''


def _serving(make_sandbox: Callable[..., Sandbox], v6: bool = False, **network: Any) -> Sandbox:
    sb = make_sandbox(network={"expose": [ECHO, HTTP, SILENT], **network})
    sb.files.write("/tmp/servers.py", SERVERS)
    sb.commands.run("python3 /tmp/servers.py" + (" v6" if v6 else "") + " >/tmp/servers.log 2>&1",
                    background=True)
    wait_until(lambda: "ready" in sb.commands.run("cat /tmp/servers.log 2>/dev/null; true").stdout, 20,
               "the servers inside to start")
    return sb


def _local(backend: str) -> bool:
    return backend.endswith("-local")


def _connect(sb: Sandbox, port: int) -> socket.socket:
    host, bound = sb.get_host(port).rsplit(":", 1)
    return socket.create_connection((host, int(bound)), timeout=20)


def _exchange(sb: Sandbox, port: int, payload: bytes) -> bytes:
    """Send everything, then the end of stream; what came back until the server's end."""
    with _connect(sb, port) as conn:
        sender = concurrent.futures.ThreadPoolExecutor(1)
        sent = sender.submit(lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        received = bytearray()
        while chunk := conn.recv(1 << 16):
            received += chunk
        sent.result(timeout=20)
        sender.shutdown()
        return bytes(received)


def _http(backend: str, request: pytest.FixtureRequest, sb: Sandbox, port: int, method: str, path: str,
          **kw: Any) -> httpx.Response:
    """A request to ``path`` on ``port`` inside: through get_host locally, the server's route remotely."""
    if _local(backend):
        return httpx.request(method, f"http://{sb.get_host(port)}{path}", timeout=30, **kw)
    server = request.getfixturevalue("api_server")
    headers = {"Authorization": f"Bearer {server.key('conformance')}", **kw.pop("headers", {})}
    return httpx.request(method, f"{server.url}/sandboxes/{sb.sandbox_id}/ports/{port}{path}", headers=headers,
                         timeout=30, **kw)


def test_an_http_server_inside_answers_through_the_port(backend: str, request: pytest.FixtureRequest,
                                                         make_sandbox: Callable[..., Sandbox]) -> None:
    sb = _serving(make_sandbox)
    body = os.urandom(300_000)
    r = _http(backend, request, sb, HTTP, "POST", "/a%20b/c?x=1&y=%2F", content=body,
              headers={"X-Custom": "kept", "X-Hop": "dropped", "Connection": "keep-alive, X-Hop"})
    assert r.status_code == 201 and r.headers["x-inside"] == "yes"
    seen = r.json()
    seen["headers"] = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["method"] == "POST" and seen["path"] == "/a%20b/c?x=1&y=%2F"  # percent-encoding kept
    assert seen["body_len"] == len(body) and seen["body_sha"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["x-custom"] == "kept"
    if not _local(backend):
        server = request.getfixturevalue("api_server")
        # the caller's API key never reaches the sandbox, nor do hop-by-hop headers
        assert server.key("conformance") not in json.dumps(seen)
        assert "authorization" not in seen["headers"] and seen["headers"]["connection"] == "close"
        assert "x-hop" not in seen["headers"] and seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    for method in ("GET", "PUT", "DELETE"):
        assert _http(backend, request, sb, HTTP, method, "/").json()["method"] == method
    stream = _http(backend, request, sb, HTTP, "GET", "/stream")
    assert stream.status_code == 200 and stream.text == "".join(f"data: {i}\n\n" for i in range(5))


def test_ports_are_closed_unless_the_policy_exposes_them(backend: str, request: pytest.FixtureRequest,
                                                         make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()  # nothing exposed
    sb.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1", background=True)
    if _local(backend):
        with pytest.raises(PolicyError, match=r"network\.expose.*port 8000 .*not exposed"):
            sb.get_host(ECHO)
    else:
        r = _http(backend, request, sb, ECHO, "GET", "/")
        assert r.status_code == 400 and r.json()["field"] == "network.expose"
        assert "not exposed" in r.json()["message"]
    exposed = make_sandbox(network={"expose": [ECHO]})

    def reach(port: int) -> None:
        if _local(backend):
            exposed.get_host(port)
        else:
            _raise_for(_http(backend, request, exposed, port, "GET", "/"))

    for port in (3128, 1080):  # the sandbox's own egress proxy ports are never a way in
        with pytest.raises(PolicyError, match="network.expose"):
            reach(port)
    for bad in (0, 65536, -1):
        with pytest.raises(PolicyError):
            reach(bad)


def _raise_for(r: httpx.Response) -> None:
    if r.status_code in (400, 422):
        raise PolicyError(str(r.json().get("field", "network.expose")), r.text)
    if r.status_code == 404:
        raise StockadeError(r.text)


def test_nothing_listening_is_said_and_recorded(backend: str, request: pytest.FixtureRequest,
                                                make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(network={"expose": [ECHO]})
    if _local(backend):
        with _connect(sb, ECHO) as conn:  # the host's listener accepts, then closes: nothing inside
            assert conn.recv(10) == b""
    else:
        r = _http(backend, request, sb, ECHO, "GET", "/")
        assert r.status_code == 502 and "nothing inside the sandbox listens on port 8000" in r.text
    wait_until(lambda: any("error" in e["data"] for e in sb.audit_log(type="port.open")), 10, "the refusal's record")
    failed = [e for e in sb.audit_log(type="port.open") if "error" in e["data"]]
    assert failed[0]["data"]["port"] == ECHO and "listens" in failed[0]["data"]["error"]


def test_tcp_bytes_flow_both_ways_exactly_with_half_close(backend: str, make_sandbox: Callable[..., Sandbox]) -> None:
    if not _local(backend):
        pytest.skip("a raw TCP forward is the local transport's (the server offers HTTP)")
    sb = _serving(make_sandbox)
    for size in (0, 1, 65535, 65536, 3 << 20):
        payload = os.urandom(size)
        assert _exchange(sb, ECHO, payload) == payload, size
    with pytest.raises(StockadeError, match="get_host\\(\\) needs the local transport"):
        portal().call(RemoteTransport("http://127.0.0.1:9", "sk_x").forward_port(sb.sandbox_id, ECHO))


def test_many_connections_at_once_and_slow_readers_hold_only_themselves(
        backend: str, make_sandbox: Callable[..., Sandbox]) -> None:
    if not _local(backend):
        pytest.skip("a raw TCP forward is the local transport's (the server offers HTTP)")
    sb = _serving(make_sandbox)
    # one client that sends 8 MiB and never reads: the echo fills its windows and stops; others go on
    stuck = _connect(sb, ECHO)
    stuck.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + 10
    while pushed < 8 << 20 and time.monotonic() < deadline:
        try:
            pushed += stuck.send(b"s" * 65536)
        except BlockingIOError:
            time.sleep(0.01)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        payloads = [os.urandom(50_000 + i) for i in range(32)]
        results = list(pool.map(lambda p: _exchange(sb, ECHO, p), payloads))
    assert results == payloads
    assert sb.commands.run("echo alive").stdout == "alive\n"  # the agent still serves
    stuck.close()


def test_a_server_on_ipv6_loopback_only_is_reached(backend: str, make_sandbox: Callable[..., Sandbox]) -> None:
    if not _local(backend):
        pytest.skip("a raw TCP forward is the local transport's (the server offers HTTP)")
    sb = _serving(make_sandbox, v6=True)
    assert _exchange(sb, ECHO, b"over ::1") == b"over ::1"


def test_connections_are_audited_with_their_byte_counts(backend: str, request: pytest.FixtureRequest,
                                                        make_sandbox: Callable[..., Sandbox]) -> None:
    sb = _serving(make_sandbox)
    if _local(backend):
        assert _exchange(sb, ECHO, b"x" * 1000) == b"x" * 1000
        port, via = ECHO, "forward"
    else:
        assert _http(backend, request, sb, HTTP, "GET", "/audited").status_code == 201
        port, via = HTTP, "api"
    wait_until(lambda: sb.audit_log(type="port.close"), 10, "the connection's close record")
    opened = sb.audit_log(type="port.open")[-1]["data"]
    closed = sb.audit_log(type="port.close")[-1]["data"]
    assert opened == {"port": port, "via": via}
    assert closed["port"] == port and closed["via"] == via and closed["bytes_in"] > 0 and closed["bytes_out"] > 0
    if _local(backend):
        assert closed["bytes_in"] == closed["bytes_out"] == 1000


def test_a_silent_server_and_a_killed_sandbox_end_connections(backend: str, request: pytest.FixtureRequest,
                                                              make_sandbox: Callable[..., Sandbox]) -> None:
    if not _local(backend):
        pytest.skip("a raw TCP forward is the local transport's (the server's is one request per connection)")
    sb = _serving(make_sandbox)
    host = sb.get_host(SILENT)
    held = socket.create_connection((host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1])), timeout=20)
    held.sendall(b"hello?")
    echo_host = sb.get_host(ECHO)
    assert sb.get_host(ECHO) == echo_host  # one listener per port
    sb.kill()
    held.settimeout(20)
    try:
        assert held.recv(10) == b""  # the connection ends with the sandbox
    except ConnectionResetError:
        pass
    held.close()
    h, p = echo_host.rsplit(":", 1)
    with pytest.raises(OSError):  # and its listener is gone
        socket.create_connection((h, int(p)), timeout=5).recv(1)


# Inside: a WebSocket server in the standard library alone (the sandbox has no WebSocket package): it picks
# the first subprotocol offered, echoes text and bytes, answers "frag" with a message in two fragments and
# "seen" with the path and headers its handshake carried, pings once after the handshake, and answers a
# close with a close.
WS_SERVER = r'''
import base64, hashlib, json, socket, struct, threading

def frame(opcode, payload, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([n]) if n < 126 else (b"\x7e" + struct.pack(">H", n) if n < 65536 else b"\x7f" + struct.pack(">Q", n))
    return head + payload

def read_exact(conn, n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data

def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    path = lines[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode()
                                           + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    proto = headers.get("sec-websocket-protocol", "").split(",")[0].strip()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Accept: {accept}\r\n" + (f"Sec-WebSocket-Protocol: {proto}\r\n" if proto else "")
                  + "\r\n").encode())
    conn.sendall(frame(0x9, b"are you there"))
    try:
        while True:
            b0, b1 = read_exact(conn, 2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", read_exact(conn, 2))[0]
            elif n == 127:
                n = struct.unpack(">Q", read_exact(conn, 8))[0]
            mask = read_exact(conn, 4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(read_exact(conn, n)))
            if opcode == 0x8:
                conn.sendall(frame(0x8, data[:2]))
                return
            if opcode == 0xA:
                continue  # the pong to our ping
            if opcode == 0x1 and data == b"frag":
                conn.sendall(frame(0x1, b"two ", fin=False) + frame(0x0, b"parts"))
            elif opcode == 0x1 and data == b"seen":
                conn.sendall(frame(0x1, json.dumps({"path": path, "headers": headers}).encode()))
            elif opcode in (0x1, 0x2):
                conn.sendall(frame(opcode, data))
    except EOFError:
        pass
    finally:
        conn.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8003))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''
WS = 8003


class WsClient:
    """A WebSocket client (wsproto over a socket): the test's browser."""

    def __init__(self, host: str, port: int, target: str, headers: list[tuple[str, str]] | None = None,
                 subprotocols: list[str] | None = None, host_header: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=20)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(wsevents.Request(host=host_header or f"{host}:{port}", target=target,
                                                          extra_headers=headers or [],
                                                          subprotocols=subprotocols or [])))
        self.accepted = self._next((wsevents.AcceptConnection, wsevents.RejectConnection))

    def _next(self, kinds: tuple[type, ...]) -> Any:
        parts: list[Any] = []
        while True:
            for event in self.conn.events():
                if isinstance(event, wsevents.Ping):
                    self.sock.sendall(self.conn.send(event.response()))
                elif isinstance(event, wsevents.TextMessage | wsevents.BytesMessage) and not event.message_finished:
                    parts.append(event.data)
                elif isinstance(event, wsevents.TextMessage | wsevents.BytesMessage) and parts:
                    parts.append(event.data)
                    joined = "".join(parts) if isinstance(event.data, str) else b"".join(parts)
                    return type(event)(data=joined)
                elif isinstance(event, kinds):
                    return event
            data = self.sock.recv(1 << 16)
            self.conn.receive_data(data or None)
            if not data:
                return None

    def send(self, data: str | bytes) -> None:
        self.sock.sendall(self.conn.send(wsevents.Message(data=data)))

    def receive(self) -> Any:
        return self._next((wsevents.TextMessage, wsevents.BytesMessage, wsevents.CloseConnection))

    def close(self) -> Any:
        self.sock.sendall(self.conn.send(wsevents.CloseConnection(code=1000)))
        answer = self._next((wsevents.CloseConnection,))
        self.sock.close()
        return answer


def test_websockets_reach_a_server_inside(backend: str, request: pytest.FixtureRequest,
                                          make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(network={"expose": [WS]})
    sb.files.write("/tmp/ws.py", WS_SERVER)
    sb.commands.run("python3 /tmp/ws.py >/tmp/ws.log 2>&1", background=True)
    wait_until(lambda: "ready" in sb.commands.run("cat /tmp/ws.log 2>/dev/null; true").stdout, 20,
               "the WebSocket server inside to start")
    if _local(backend):  # a TCP forward carries the WebSocket as it is
        host, port = sb.get_host(WS).rsplit(":", 1)
        target, headers = "/hmr?token=a%20b", [("X-Custom", "kept")]
    else:
        server = request.getfixturevalue("api_server")
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        key = server.key("conformance")
        target = f"/sandboxes/{sb.sandbox_id}/ports/{WS}/hmr?token=a%20b"
        headers = [("Authorization", f"Bearer {key}"), ("X-Custom", "kept")]
    client = WsClient(host, int(port), target, headers, subprotocols=["vite-hmr", "other"])
    assert isinstance(client.accepted, wsevents.AcceptConnection), client.accepted
    assert client.accepted.subprotocol == "vite-hmr"
    client.send("hello")
    assert client.receive().data == "hello"
    payload = os.urandom(200_000)
    client.send(payload)
    assert client.receive().data == payload
    client.send("frag")
    assert client.receive().data == "two parts"  # fragments reassembled
    client.send("seen")
    seen = json.loads(client.receive().data)
    assert seen["path"] == "/hmr?token=a%20b" and seen["headers"]["x-custom"] == "kept"
    assert "authorization" not in seen["headers"]
    closed = client.close()
    assert closed is not None and closed.code == 1000
    if not _local(backend):
        # a port not exposed, and a wrong key, are refused at the handshake
        for port_, auth in ((WS + 1, f"Bearer {key}"), (WS, "Bearer sk_wrong")):
            refused = WsClient(host, int(port), f"/sandboxes/{sb.sandbox_id}/ports/{port_}/", [("Authorization", auth)])
            assert isinstance(refused.accepted, wsevents.RejectConnection) or refused.accepted is None, refused.accepted
            refused.sock.close()
    wait_until(lambda: [e for e in sb.audit_log(type="port.close") if e["data"]["port"] == WS], 10,
               "the WebSocket's close record")
