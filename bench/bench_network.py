"""Egress broker overhead, against the same client talking straight to the upstream from the host.

    python bench/bench_network.py [--requests 200] [--runtime jail,gvisor] [--markdown]

- a 1 MiB download over plain HTTP (through the HTTP proxy), repeated, as throughput;
- small HTTPS requests, each on a new connection through CONNECT (TLS end to end), as latency per request.
The client is one Python script, run on the host (direct) and inside a sandbox (through the broker).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from table import print_table, private_audit_store  # noqa: E402
from tests.tls_support import self_signed  # noqa: E402

from stockade import Sandbox  # noqa: E402
from stockade.sdk.portal import portal  # noqa: E402
from stockade.sdk.sandbox import _transport  # noqa: E402

CLIENT = r'''
import http.client, json, os, ssl, sys, time
mode, host, port, tls_port, n, cafile = sys.argv[1:7]
port, tls_port, n = int(port), int(tls_port), int(n)
proxy = os.environ.get("HTTP_PROXY")
def conn(p, tls):
    ctx = ssl.create_default_context(cafile=cafile) if tls else None
    cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
    if proxy:
        c = cls("127.0.0.1", 3128, **({"context": ctx} if tls else {}))
        if tls: c.set_tunnel(host, p)
        return c, (f"http://{host}:{p}" if not tls else "")
    return cls(host if tls else "127.0.0.1", p, **({"context": ctx} if tls else {})), ""
out = {}
t = time.perf_counter(); total = 0
for _ in range(20):
    c, prefix = conn(port, False); c.request("GET", prefix + "/big", headers={"Host": f"{host}:{port}"})
    total += len(c.getresponse().read()); c.close()
out["mib_per_s"] = total / (1 << 20) / (time.perf_counter() - t)
t = time.perf_counter(); total = 0
for _ in range(20):
    c, _ = conn(tls_port, True); c.request("GET", "/big", headers={"Host": host})
    total += len(c.getresponse().read()); c.close()
out["tls_mib_per_s"] = total / (1 << 20) / (time.perf_counter() - t)
plain = []
for _ in range(n):
    t = time.perf_counter()
    c, prefix = conn(port, False); c.request("GET", prefix + "/small", headers={"Host": f"{host}:{port}"})
    c.getresponse().read(); c.close()
    plain.append((time.perf_counter() - t) * 1000)
plain.sort(); out["plain_p50_ms"] = plain[len(plain) // 2]
lat = []
for _ in range(n):
    t = time.perf_counter()
    c, _ = conn(tls_port, True); c.request("GET", "/small", headers={"Host": host}); c.getresponse().read(); c.close()
    lat.append((time.perf_counter() - t) * 1000)
lat.sort(); out["p50_ms"] = lat[len(lat) // 2]; out["p95_ms"] = lat[int(len(lat) * .95)]
print(json.dumps(out))
'''


UPSTREAMS = r'''
import http.server, os, ssl, sys, threading
big = os.urandom(1 << 20)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: Nagle would hold the body for an ACK
    def do_GET(self):
        body = big if self.path == "/big" else b"ok"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
tls.socket = ctx.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print(plain.server_address[1], tls.server_address[1], flush=True)
plain.serve_forever()
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--runtime", default="jail", help="comma list: each runtime's sandbox, same upstreams")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    with tempfile.TemporaryDirectory(prefix="stockade-bench-net-") as tmp:
        run(Path(tmp), args)


def run(tmp: Path, args: argparse.Namespace) -> None:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    self_signed(cert, key, "api.example.test")
    # The upstreams run in their own process: in this one they would share a GIL with the broker.
    servers = subprocess.Popen([sys.executable, "-c", UPSTREAMS, str(cert), str(key)], stdout=subprocess.PIPE,
                               text=True)
    assert servers.stdout is not None
    port, tls_port = (int(p) for p in servers.stdout.readline().split())
    (tmp / "client.py").write_text(CLIENT)
    # direct: the host resolves api.example.test through a hosts-like mapping: the client connects to 127.0.0.1
    # for plain HTTP and uses SNI/verification for the name over TLS via a socket patch
    direct_client = CLIENT.replace('cls(host if tls else "127.0.0.1", p,', 'cls("127.0.0.1", p,').replace(
        'ctx = ssl.create_default_context(cafile=cafile) if tls else None',
        'ctx = ssl.create_default_context(cafile=cafile) if tls else None\n    if ctx: ctx.check_hostname = False')
    (tmp / "direct.py").write_text(direct_client)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    direct = subprocess.run([sys.executable, str(tmp / "direct.py"), "direct", "api.example.test", str(port),
                             str(tls_port), str(args.requests), str(cert)], capture_output=True, text=True, env=env)
    import json

    d = json.loads(direct.stdout)

    async def map_names() -> None:
        async def resolver(host: str, p: int) -> list[ipaddress.IPv4Address]:
            return [ipaddress.IPv4Address("127.0.0.1")] if host.endswith(".example.test") else []

        (await _transport(None).manager()).resolver = resolver

    portal().call(map_names())
    policy = {"network": {"mode": "allowlist", "allow": ["api.example.test"], "allow_private": ["127.0.0.1/32"],
                          "max_egress_bytes": "8GiB"}}
    rows = []
    for runtime in args.runtime.split(","):
        with Sandbox.create(policy=policy, runtime=runtime) as sb:
            sb.files.write("client.py", CLIENT)
            sb.files.write("ca.pem", cert.read_text())
            r = sb.commands.run(["python3", "client.py", "proxy", "api.example.test", str(port), str(tls_port),
                                 str(args.requests), "ca.pem"])
            b = json.loads(r.stdout or "{}") if r.exit_code == 0 else {}
            if not b:
                raise SystemExit(f"sandbox client failed ({runtime}): {r.stderr}")
        tag = f"{runtime}: "
        rows += [
            (tag + "1 MiB downloads, HTTP through the proxy", f"{b['mib_per_s']:.0f} MiB/s",
             f"direct {d['mib_per_s']:.0f} MiB/s ({100 * b['mib_per_s'] / d['mib_per_s']:.0f}% of direct)"),
            (tag + "1 MiB downloads, HTTPS through CONNECT", f"{b['tls_mib_per_s']:.0f} MiB/s",
             f"direct {d['tls_mib_per_s']:.0f} MiB/s "
             f"({100 * b['tls_mib_per_s'] / d['tls_mib_per_s']:.0f}% of direct)"),
            (tag + f"{args.requests} small HTTPS requests via CONNECT, p50", f"{b['p50_ms']:.2f} ms",
             f"direct {d['p50_ms']:.2f} ms (+{b['p50_ms'] - d['p50_ms']:.2f} ms)"),
            (tag + "same, p95", f"{b['p95_ms']:.2f} ms", f"direct {d['p95_ms']:.2f} ms"),
            (tag + f"{args.requests} small plain HTTP requests, p50", f"{b['plain_p50_ms']:.2f} ms",
             f"direct {d['plain_p50_ms']:.2f} ms (+{b['plain_p50_ms'] - d['plain_p50_ms']:.2f} ms)"),
        ]
    servers.terminate()
    servers.wait()
    print_table(["measure", "through the broker", "baseline (same run)"], rows, args.markdown)

if __name__ == "__main__":
    main()
