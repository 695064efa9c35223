"""The server under load, beside the same workload run in-process (local mode, no HTTP) in the same run.

    python bench/bench_server.py [--clients 50] [--execs 5] [--database-url URL] [--markdown]

Each client: create a sandbox, run `true` N times, kill it. The server (`stockade serve`, its own process,
SQLite audit store unless --database-url) and the clients share this machine. Measured: errors, exec
round trip p50/p95 (POST /commands, JSON answer), and create + first exec, with all clients at once
and with one client alone; the server runs once without and once with a warm pool as large as the
burst. These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import AsyncSandbox  # noqa: E402

CONFIG = """
[server]
warm_pool = {warm}
warm_pool_policy = {policy}

[tenant_defaults]
max_sandboxes = 1000
max_memory = "1TiB"
max_cpus = 1000
rate_limit = 100000
rate_burst = 100000
"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class LeanClient:
    """One keep-alive HTTP/1.1 connection, JSON in and out, written for low CPU: the clients share the two
    cores with the server, and a heavyweight client (httpx costs ~4 ms of CPU per request here) would
    measure itself. Handles exactly what the server answers (Content-Length bodies)."""

    def __init__(self, url: str, key: str) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        self.auth = f"Authorization: Bearer {key}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        assert self.reader is not None
        data = json.dumps(body).encode() if body is not None else b""
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self.auth +
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        if status >= 400:
            raise RuntimeError(f"{method} {path}: {status} {payload[:200]!r}")
        return status, json.loads(payload) if payload else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def remote_client(url: str, key: str, body: dict[str, Any], execs: int, out: dict[str, list[Any]]) -> None:
    http = LeanClient(url, key)
    try:
        t0 = time.perf_counter()
        sid = (await http.call("POST", "/sandboxes", body))[1]["sandbox_id"]
        for i in range(execs):
            t = time.perf_counter()
            _, result = await http.call("POST", f"/sandboxes/{sid}/commands", {"argv": ["true"]})
            assert result["exit_code"] == 0
            now = time.perf_counter()
            out["exec"].append((now - t) * 1000)
            if i == 0:
                out["first"].append((now - t0) * 1000)
        await http.call("DELETE", f"/sandboxes/{sid}")
    except Exception as exc:  # noqa: BLE001 - counted and reported
        out["errors"].append(repr(exc)[:200])
    finally:
        await http.close()


async def local_client(execs: int, out: dict[str, list[Any]]) -> None:
    try:
        t0 = time.perf_counter()
        sb = await AsyncSandbox.create(bench_policy())
        for i in range(execs):
            t = time.perf_counter()
            assert (await sb.commands.run(["true"])).exit_code == 0
            now = time.perf_counter()
            out["exec"].append((now - t) * 1000)
            if i == 0:
                out["first"].append((now - t0) * 1000)
        await sb.kill()
    except Exception as exc:  # noqa: BLE001
        out["errors"].append(repr(exc)[:200])


async def run_remote(url: str, key: str, clients: int, execs: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"exec": [], "first": [], "errors": []}
    body = {"policy": bench_policy().model_dump(mode="json")}
    await asyncio.gather(*(remote_client(url, key, body, execs, out) for _ in range(clients)))
    return out


async def run_local(clients: int, execs: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"exec": [], "first": [], "errors": []}
    await asyncio.gather(*(local_client(execs, out) for _ in range(clients)))
    return out


def start_server(data_dir: Path, config: Path, database_url: str | None,
                 warm: int = 0) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {**os.environ}
    if database_url:
        env["STOCKADE_DATABASE_URL"] = database_url
    cli = [sys.executable, "-m", "stockade.cli"]
    common = ["--data-dir", str(data_dir), "--config", str(config)]
    key = subprocess.run([*cli, "keys", "create", "--tenant", "bench", *common], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cli, "serve", "--port", str(port), *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            health = httpx.get(f"{url}/health", timeout=1)
            if health.status_code == 200 and health.json()["warm"] >= warm:
                return proc, url, key
            time.sleep(0.1)
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def _toml_inline(value: Any) -> str:
    """An inline TOML value (tables and arrays of strings, numbers and booleans; None dropped)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--execs", type=int, default=5)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    results: dict[str, dict[str, list[Any]]] = {}
    for warm in (0, args.clients):
        data_dir = Path(tempfile.mkdtemp(prefix="stockade-bench-server-"))
        config = data_dir / "server.toml"
        config.write_text(CONFIG.format(warm=warm, policy=_toml_inline(bench_policy().model_dump(mode="json"))))
        proc, url, key = start_server(data_dir, config, args.database_url, warm)
        label = f"server, warm pool {warm}"
        try:
            if not warm:
                asyncio.run(run_remote(url, key, 2, 2))  # warm-up: the server's first sandboxes
            results[f"{label}, {args.clients} clients"] = asyncio.run(run_remote(url, key, args.clients, args.execs))
            if warm:  # the burst emptied the pool: let it refill before the single client
                while httpx.get(f"{url}/health").json()["warm"] < warm:
                    time.sleep(0.2)
            results[f"{label}, 1 client"] = asyncio.run(run_remote(url, key, 1, args.execs * 5))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            shutil.rmtree(data_dir, ignore_errors=True)
    results[f"local (no HTTP), {args.clients} clients"] = asyncio.run(run_local(args.clients, args.execs))
    results["local (no HTTP), 1 client"] = asyncio.run(run_local(1, args.execs * 5))
    rows: list[tuple[str, ...]] = []
    for name, r in results.items():
        rows.append((name, str(len(r["errors"])), f"{pct(r['exec'], 50):.2f}", f"{pct(r['exec'], 95):.2f}",
                     f"{statistics.median(r['first']):.1f}", f"{pct(r['first'], 95):.1f}"))
        for err in r["errors"][:3]:
            print(f"  error ({name}): {err}", file=sys.stderr)
    store = "PostgreSQL" if args.database_url else "SQLite (WAL)"
    print(f"audit store: {store}; {args.execs} execs per client (x5 for one client)")
    print_table(["workload", "errors", "exec p50 ms", "exec p95 ms", "create+1st exec p50 ms",
                 "create+1st exec p95 ms"], rows, args.markdown)


if __name__ == "__main__":
    main()
