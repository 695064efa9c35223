"""An exposed port (network.expose) reached through get_host(), beside its baseline in the same run: the
same server program on the host's own loopback, reached directly. Per runtime: a small HTTP request's
round trip on a new connection, and a download's throughput on one connection.

    python bench/bench_ports.py [--runs 200] [--mib 64] [--runtimes jail,gvisor] [--markdown]

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import Sandbox  # noqa: E402

PORT = 8000
# One small answer per connection at /, and /big: MIB MiB of zeros, read to the end.
SERVER = r'''
import socket, sys, threading
port, mib = int(sys.argv[1]), int(sys.argv[2])
block = b"\0" * (1 << 20)
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            return
        head += data
    if head.startswith(b"GET /big"):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (mib << 20))
        for _ in range(mib):
            conn.sendall(block)
    else:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def _request(host: str, port: int, path: str) -> int:
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
            if path == "/" and b"ok" in data:
                break
        return total


def _measure(host: str, port: int, runs: int, mib: int) -> tuple[float, float, float]:
    """(p50 ms, p90 ms) of a request on a new connection, MiB/s of one /big download."""
    _request(host, port, "/")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        _request(host, port, "/")
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    t = time.perf_counter()
    got = _request(host, port, "/big")
    rate = got / (1 << 20) / (time.perf_counter() - t)
    return statistics.median(times), times[int(len(times) * 0.9)], rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runtimes", default="jail,gvisor")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    private_audit_store()
    rows = []
    bare = subprocess.Popen([sys.executable, "-c", SERVER, "18765", str(args.mib)], stdout=subprocess.PIPE)
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == b"ready"
        p50, p90, rate = _measure("127.0.0.1", 18765, args.runs, args.mib)
        rows.append(("baseline: direct to the host's loopback", f"{p50:.2f} ms", f"{p90:.2f} ms", f"{rate:.0f} MiB/s"))
    finally:
        bare.kill()
        bare.wait()
    policy = bench_policy().with_overrides(network={"expose": [PORT]})
    for runtime in [r for r in args.runtimes.split(",") if r]:
        with Sandbox.create(policy=policy, runtime=runtime, timeout=600) as sb:
            sb.files.write("/tmp/server.py", SERVER)
            sb.commands.run(f"python3 /tmp/server.py {PORT} {args.mib} >/tmp/server.log 2>&1", background=True)
            deadline = time.monotonic() + 20
            while "ready" not in sb.commands.run("cat /tmp/server.log 2>/dev/null; true").stdout:
                if time.monotonic() > deadline:
                    sys.exit("the server inside did not start")
                time.sleep(0.1)
            host, port = sb.get_host(PORT).rsplit(":", 1)
            p50, p90, rate = _measure(host, int(port), args.runs, args.mib)
            rows.append((f"{runtime}: get_host({PORT})", f"{p50:.2f} ms", f"{p90:.2f} ms", f"{rate:.0f} MiB/s"))
    print_table(["new connection + small request", "p50", "p90", f"{args.mib} MiB on one connection"], rows,
                args.markdown)


if __name__ == "__main__":
    main()
