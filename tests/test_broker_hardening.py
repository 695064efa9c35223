"""The broker attacked the way hostile code inside a sandbox would: secrets echoed back in every framing and
encoding, ClientHellos fragmented, delayed or naming another host, Host headers that lie. The proxy runs on
its own event loop against local upstreams on 127.0.0.1; made-up *.example.test names resolve there."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import json
import random
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade import Policy, PolicyError
from stockade.broker import proxy
from stockade.broker.proxy import Egress, serve
from stockade.broker.rules import Rules, parse_rule
from stockade.broker.secrets import BoundSecret, SandboxCA

from .tls_support import self_signed
from .waiting import wait_until

SECRET = b"sk-live-Zq9/8xY+vW7-uT6sR5qP4oN3"


class Broker:
    """``proxy.serve`` on a private loop in a thread, listening on 127.0.0.1."""

    def __init__(self, allow: list[str], secrets: list[BoundSecret] | None = None,
                 ca: SandboxCA | None = None, upstream_ssl: ssl.SSLContext | None = None) -> None:
        self.events: list[dict[str, object]] = []

        async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address]:
            return [ipaddress.IPv4Address("127.0.0.1")] if host.endswith(".example.test") else []

        self.egress = Egress("sbx-test", Rules(allow, [], ["127.0.0.1/32"]), 64, 1 << 30, self.events.append,
                             resolver, secrets or [], ca, upstream_ssl)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve(reader, writer, self.egress)

        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0),
                                                       self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def connect(self, kind: bytes = b"H") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(kind)
        return s

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.05)  # let the closed transports finish on this loop

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Upstream:
    """A raw TCP (optionally TLS) server on 127.0.0.1: ``answer(request_head) -> list of byte pieces``,
    each sent with its own write; everything received is kept in ``received``."""

    def __init__(self, answer: Callable[[bytes], list[bytes]] | None, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.tls = answer, tls
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                self.received.append(data)
                while self.answer is not None and b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    for piece in self.answer(head + b"\r\n\r\n"):
                        conn.sendall(piece)
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def chunked(body: bytes, sizes: Iterator[int]) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        n = next(sizes)
        out += b"%x\r\n" % len(body[pos:pos + n]) + body[pos:pos + n] + b"\r\n"
        pos += n
    return out + b"0\r\n\r\n"


def echo_chunked(sizes: Callable[[], Iterator[int]], encode: Callable[[bytes], bytes] = lambda b: b,
                 extra_headers: bytes = b"") -> Callable[[bytes], list[bytes]]:
    """An upstream that echoes the request head (encoded) as a chunked body, each chunk its own write."""
    def answer(head: bytes) -> list[bytes]:
        body = chunked(encode(head), sizes())
        pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra_headers + b"\r\n"]
        pos = 0
        for n in sizes():  # the chunked stream itself in small writes too
            if pos >= len(body):
                break
            pieces.append(body[pos:pos + n])
            pos += n
        return [*pieces, body[pos:]] if pos < len(body) else pieces
    return answer


@pytest.fixture
def tls_setup(tmp_path: Path) -> Iterator[dict[str, object]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "api.example.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    ca = SandboxCA("sbx-test", __import__("datetime").timedelta(hours=1))
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    yield {"server": server, "trust": trust, "ca": ca, "client": ssl.create_default_context(cafile=str(tmp_path /
                                                                                                       "ca.pem"))}


def secret_broker(tls_setup: dict[str, object]) -> Broker:
    bound = BoundSecret("API_KEY", SECRET, b"stockade-secret-api_key-0123456789abcdef01234567",
                        (parse_rule("api.example.test"),), "Authorization", "Bearer {secret}")
    return Broker(["*.example.test"], [bound], tls_setup["ca"], tls_setup["trust"])  # type: ignore[arg-type]


def _read_response(f: object) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response (head, de-chunked body) from a file object."""
    rf = f  # type: ignore[assignment]
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = rf.readline()  # type: ignore[attr-defined]
        if not line:
            break
        head += line
    lower = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int(rf.readline().split(b";")[0], 16)  # type: ignore[attr-defined]
            data = rf.read(size + 2)[:-2]  # type: ignore[attr-defined]
            if size == 0:
                break
            body += data
    elif b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = rf.read(n)  # type: ignore[attr-defined]
    return head, body


def intercepted(broker: Broker, tls_setup: dict[str, object], port: int, requests: list[bytes]) -> list[bytes]:
    """CONNECT to api.example.test, TLS with the sandbox CA, send each request on one connection, and
    return everything received (heads and decoded bodies) per response."""
    s = broker.connect()
    s.sendall(b"CONNECT api.example.test:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    t = tls_setup["client"].wrap_socket(s, server_hostname="api.example.test")  # type: ignore[attr-defined]
    f = t.makefile("rb")
    out = []
    try:
        for req in requests:
            t.sendall(req)
            head, body = _read_response(f)
            if not head:
                break
            if b"content-encoding: gzip" in head.lower():
                body = gzip.decompress(body)
            out.append(head + body)
    finally:
        t.close()
    return out


def request(host: bytes = b"api.example.test", extra: bytes = b"") -> bytes:
    return b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def _leaks(data: bytes) -> bool:
    """The secret, or a plausible encoding of it, in what the sandbox received."""
    if SECRET in data or SECRET in urllib.parse.unquote_to_bytes(data):
        return True
    if SECRET in data.replace(b"\\/", b"/"):
        return True
    for token in data.replace(b"\\/", b"/").split():
        for cand in (token, token.strip(b'"\',')):
            for pad in (b"", b"=", b"=="):
                for dec in (base64.b64decode, base64.urlsafe_b64decode):
                    try:
                        if SECRET in dec(cand + pad):
                            return True
                    except ValueError:
                        pass
    try:
        if SECRET in json.loads(data).encode():
            return True
    except (ValueError, AttributeError):
        pass
    return False


def _fixed(n: int) -> Callable[[], Iterator[int]]:
    return lambda: iter(lambda: n, None)


def _seeded(seed: int) -> Callable[[], Iterator[int]]:
    def sizes() -> Iterator[int]:
        rnd = random.Random(seed)
        while True:
            yield rnd.randint(1, 13)
    return sizes


ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "raw": lambda b: b,
    "base64": base64.b64encode,
    "base64-shift1": lambda b: base64.b64encode(b"x" + b),
    "base64-shift2": lambda b: base64.b64encode(b"xy" + b),
    "base64url": base64.urlsafe_b64encode,
    "percent-upper": lambda b: urllib.parse.quote_from_bytes(b, safe=b"").encode(),
    "percent-lower": lambda b: "".join(f"%{c:02x}" for c in b).encode(),
    "json-slash": lambda b: json.dumps(b.decode("latin-1")).replace("/", "\\/").encode(),
    "json-unicode": lambda b: ("\"" + "".join(f"\\u{c:04x}" for c in b) + "\"").encode(),
    "json-of-base64": lambda b: json.dumps(base64.b64encode(b).decode()).replace("/", "\\/").encode(),
}


@pytest.mark.parametrize("framing", ["1-byte", "7-byte", "seeded-1", "seeded-2"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_echoed_secret_never_comes_back_whatever_the_framing_and_encoding(tls_setup, framing, encoding):
    sizes = {"1-byte": _fixed(1), "7-byte": _fixed(7), "seeded-1": _seeded(1), "seeded-2": _seeded(2)}[framing]
    up = Upstream(echo_chunked(sizes, ENCODINGS[encoding]), tls_setup["server"])  # type: ignore[arg-type]
    broker = secret_broker(tls_setup)
    try:
        [answer] = intercepted(broker, tls_setup, up.port, [request()])
        assert answer.startswith(b"HTTP/1.1 200")
        assert not _leaks(answer), answer
        assert b"*" * 8 in answer  # masked, not dropped
    finally:
        broker.close()
        up.close()


def test_the_secret_is_masked_in_response_headers_split_across_writes(tls_setup):
    def answer(head: bytes) -> list[bytes]:
        auth = [line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization")][0]
        whole = b"HTTP/1.1 200 OK\r\nX-Echo: " + auth + b"\r\nX-B64: " + base64.b64encode(auth) + \
            b"\r\nContent-Length: 2\r\n\r\nok"
        return [whole[i:i + 1] for i in range(len(whole))]

    up = Upstream(answer, tls_setup["server"])  # type: ignore[arg-type]
    broker = secret_broker(tls_setup)
    try:
        [got] = intercepted(broker, tls_setup, up.port, [request()])
        assert got.endswith(b"ok") and not _leaks(got), got
    finally:
        broker.close()
        up.close()


def test_every_request_on_a_keep_alive_connection_is_injected_checked_and_masked(tls_setup):
    up = Upstream(echo_chunked(_seeded(3)), tls_setup["server"])  # type: ignore[arg-type]
    broker = secret_broker(tls_setup)
    try:
        answers = intercepted(broker, tls_setup, up.port, [request(), request(), request(b"API.Example.Test.")])
        assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert all(b"Bearer " + b"*" * len(SECRET) in a and not _leaks(a) for a in answers), answers
        # a request for another host on the same connection: 403 with the reason, and no secret goes out
        before = len(b"".join(up.received))
        answers = intercepted(broker, tls_setup, up.port, [request(), request(b"denied.example.test")])
        assert answers[0].startswith(b"HTTP/1.1 200")
        assert answers[1].startswith(b"HTTP/1.1 403 stockade: Host 'denied.example.test' differs")
        assert b"denied.example.test" not in b"".join(up.received)[before:]
    finally:
        broker.close()
        up.close()


def test_a_compressed_echo_is_decoded_and_masked_or_refused(tls_setup):
    def gz(head: bytes) -> list[bytes]:
        body = gzip.compress(head)
        return [b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body), body]

    def br(head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: %d\r\n\r\n" % len(head), head]

    for answer, expect in ((gz, b"HTTP/1.1 200"), (br, b"HTTP/1.1 502 stockade: the upstream answered with")):
        up = Upstream(answer, tls_setup["server"])  # type: ignore[arg-type]
        broker = secret_broker(tls_setup)
        try:
            [got] = intercepted(broker, tls_setup, up.port, [request()])
            assert got.startswith(expect) and not _leaks(got), got
        finally:
            broker.close()
            up.close()


def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def two_records(hello: bytes, first: int) -> bytes:
    body = hello[5:]
    return (b"\x16\x03\x01" + first.to_bytes(2, "big") + body[:first] +
            b"\x16\x03\x01" + (len(body) - first).to_bytes(2, "big") + body[first:])


@pytest.fixture
def plain_broker() -> Iterator[tuple[Broker, Upstream]]:
    up = Upstream(None)
    broker = Broker(["*.example.test", "127.0.0.1", f"tcp://git.example.test:{up.port}"])
    yield broker, up
    broker.close()
    up.close()


def _tunnel(broker: Broker, port: int, kind: str, host: str = "api.example.test") -> socket.socket:
    if kind == "connect":
        s = broker.connect()
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    else:
        s = broker.connect(b"S")
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + port.to_bytes(2, "big"))
        assert s.recv(10)[:2] == b"\x05\x00"
    return s


def _closed_without_forwarding(s: socket.socket, up: Upstream) -> bool:
    s.settimeout(10)
    try:
        rest = s.recv(100)
    except OSError:
        rest = b""
    return rest == b"" and up.received == []


@pytest.mark.parametrize("kind", ["connect", "socks"])
@pytest.mark.parametrize("attack", ["one-write", "3-bytes-then-rest", "two-records", "two-records-two-writes",
                                    "byte-by-byte", "no-sni", "sni-trailing-dot-other"])
def test_a_clienthello_for_another_name_never_leaves(plain_broker, kind, attack):
    broker, up = plain_broker
    s = _tunnel(broker, up.port, kind)
    hello = client_hello(None if attack == "no-sni" else
                         "denied.example.test." if attack == "sni-trailing-dot-other" else "denied.example.test")
    pieces = {"3-bytes-then-rest": [hello[:3], hello[3:]], "two-records": [two_records(hello, 10)],
              "two-records-two-writes": [two_records(hello, 10)[:15], two_records(hello, 10)[15:]],
              "byte-by-byte": [hello[i:i + 1] for i in range(len(hello))]}.get(attack, [hello])
    for piece in pieces:
        s.sendall(piece)
    assert _closed_without_forwarding(s, up)
    assert broker.events[-1]["decision"] == "deny"
    assert broker.events[-1]["rule"] in ("sni-mismatch", "tunnel-protocol")


@pytest.mark.parametrize("kind", ["connect", "socks"])
def test_the_matching_clienthello_passes_however_fragmented(plain_broker, kind):
    broker, up = plain_broker
    s = _tunnel(broker, up.port, kind)
    hello = client_hello("API.example.test")  # case does not matter
    record = two_records(hello, 10)
    s.sendall(record[:3])
    s.sendall(record[3:])
    wait_until(lambda: b"".join(up.received) == record, 5, "the ClientHello to be forwarded exactly, once classified",
               show=lambda: up.received)
    s.close()


def test_a_client_that_waits_past_the_timeout_gets_a_closed_tunnel(plain_broker, monkeypatch):
    monkeypatch.setattr(proxy, "CLASSIFY_TIMEOUT", 0.3)
    broker, up = plain_broker
    for kind in ("connect", "socks"):
        s = _tunnel(broker, up.port, kind)
        s.settimeout(10)
        assert s.recv(100) == b""  # closed by the broker, nothing was relayed
        with pytest.raises(OSError):
            s.sendall(client_hello("denied.example.test"))
            s.sendall(b"x" * 100000)
    assert up.received == []
    assert "within 0.3s" in str(broker.events[-1]["reason"])


@pytest.mark.parametrize("first", [b"SSH-2.0-OpenSSH_9.6\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                   b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"\x16\x03\x01\xff\xff" + b"\x01" * 70000])
def test_other_protocols_need_an_explicit_tcp_rule(plain_broker, first):
    broker, up = plain_broker
    s = _tunnel(broker, up.port, "connect")
    s.sendall(first[:65536])
    assert _closed_without_forwarding(s, up)
    s = _tunnel(broker, up.port, "connect", host="git.example.test")  # tcp://git.example.test:PORT
    s.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
    wait_until(lambda: up.received, 5, "the SSH banner to reach the upstream")
    assert up.received == [b"SSH-2.0-OpenSSH_9.6\r\n"]
    s.close()


def test_an_ip_literal_tunnel_takes_no_sni_or_an_allowed_name(plain_broker):
    broker, up = plain_broker
    for name, passes in ((None, True), ("api.example.test", True), ("denied.invalid", False)):
        up.received.clear()
        s = _tunnel(broker, up.port, "connect", host="127.0.0.1")
        s.sendall(client_hello(name))
        if passes:
            wait_until(lambda: up.received, 5, f"the ClientHello with SNI {name!r} to reach the upstream")
            s.close()
        else:
            assert _closed_without_forwarding(s, up)


HOST_TRICKS = [
    b"GET / HTTP/1.1\r\nHost: denied.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test\r\nHost: denied.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test:1\r\n\r\n",
    b"GET http://denied.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test\r\n denied.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : denied.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test@denied.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 0\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: denied.example.test\r\n\r\n",
]


@pytest.mark.parametrize("kind", ["connect", "socks"])
@pytest.mark.parametrize("trick", HOST_TRICKS)
def test_plain_http_in_a_tunnel_must_name_the_tunnels_host(kind, trick):
    up = Upstream(lambda head: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    broker = Broker([f"api.example.test:{up.port}"])
    try:
        s = _tunnel(broker, up.port, kind)
        s.sendall(trick.replace(b"api.example.test:1", b"api.example.test:%d" % (up.port + 1)))
        s.settimeout(10)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        assert b"denied.example.test" not in b"".join(up.received)
        assert got.count(b"HTTP/1.1 200") <= 1 and (b" 403 stockade: " in got or b" 400 " in got), got
        if b"Content-Length: 0" in trick:  # the first, honest request was answered
            assert got.startswith(b"HTTP/1.1 200")
    finally:
        broker.close()
        up.close()


def test_an_absolute_uri_request_with_another_host_header_is_refused_and_gets_no_secret(tls_setup):
    up = Upstream(lambda head: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    bound = BoundSecret("API_KEY", SECRET, b"stockade-secret-api_key-0123456789abcdef01234567",
                        (parse_rule("api.example.test"),), "Authorization", "Bearer {secret}")
    broker = Broker(["*.example.test"], [bound], tls_setup["ca"], tls_setup["trust"])  # type: ignore[arg-type]
    try:
        for host in (b"denied.example.test", b"api.example.test:1", b"API.EXAMPLE.TEST.evil"):
            s = broker.connect()
            s.sendall(b"GET http://api.example.test:%d/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (up.port, host))
            got = s.makefile("rb").read()
            assert got.startswith(b"HTTP/1.1 403 stockade: Host "), got
            assert b"X-Stockade-Reason: stockade: Host " in got
        s = broker.connect()  # the honest one passes, spelled any case, with its port
        s.sendall(b"GET http://api.example.test:%d/ HTTP/1.1\r\nHost: API.example.test.:%d\r\n\r\n"
                  % (up.port, up.port))
        head, body = _read_response(s.makefile("rb"))
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        assert b"denied" not in b"".join(up.received) and SECRET not in b"".join(up.received)
    finally:
        broker.close()
        up.close()


def test_a_denied_connect_names_the_reason_in_the_status_line(plain_broker):
    import http.client

    broker, _ = plain_broker
    s = broker.connect()
    s.sendall(b"CONNECT api.elsewhere.invalid:443 HTTP/1.1\r\n\r\n")
    line = s.makefile("rb").readline()
    assert line == b"HTTP/1.1 403 stockade: api.elsewhere.invalid:443 is not in network.allow\r\n"

    class Proxied(http.client.HTTPConnection):  # what pip's and requests' tunnel error prints
        def connect(self) -> None:
            self.sock = broker.connect()
            self._tunnel()  # type: ignore[attr-defined]

    conn = Proxied("127.0.0.1", broker.port, timeout=10)
    conn.set_tunnel("api.elsewhere.invalid", 443)
    with pytest.raises(OSError, match="403 stockade: api.elsewhere.invalid:443 is not in network.allow"):
        conn.connect()


@pytest.mark.parametrize(("rule", "hint"), [("http://api.example.com/v1", "did you mean 'api.example.com'?"),
                                            ("https://api.example.com:8443/", "did you mean 'api.example.com:8443'?"),
                                            ("api.example.com/v1", "did you mean 'api.example.com'?")])
def test_a_url_in_network_allow_says_a_host_is_expected(rule, hint):
    with pytest.raises(PolicyError) as err:
        Policy.from_dict({"network": {"mode": "allowlist", "allow": [rule]}})
    assert err.value.field.startswith("network.allow")
    assert "expected a host, optionally with :port" in err.value.reason and hint in err.value.reason


def test_tcp_rules_need_a_port():
    with pytest.raises(PolicyError, match="tcp:// rule needs one host and a port"):
        Policy.from_dict({"network": {"mode": "allowlist", "allow": ["tcp://git.example.com"]}})
    Policy.from_dict({"network": {"mode": "allowlist", "allow": ["tcp://git.example.com:22"]}})
