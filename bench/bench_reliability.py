"""The server under bounded load, counting what breaks: errors, latency tails and what is left behind.

    python bench/bench_reliability.py [--levels 10,30] [--seconds 20] [--network allowlist|none] [--markdown]

At each concurrency level, that many clients loop for --seconds: create a sandbox (network.mode allowlist
by default: each sandbox gets a broker endpoint, the path of issue 18.1), run one command, kill it.
Reported per level: cycles, errors (any non-2xx or lost connection), DELETE p50/p95/p99, cycle p50/p95/p99,
and leftovers once the clients are done: sandboxes the server still lists, cgroups and broker directories
on the host. Loopback only; the server is its own process (`stockade serve`). Measurements, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from bench_server import CONFIG, LeanClient, _toml_inline, pct, policy, start_server  # noqa: E402
from table import print_table, private_audit_store  # noqa: E402

from stockade.config import HostConfig  # noqa: E402


async def client(url: str, key: str, body: dict[str, Any], until: float, out: dict[str, list[Any]]) -> None:
    http = LeanClient(url, key)
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                sid = (await http.call("POST", "/sandboxes", body))[1]["sandbox_id"]
                out["ids"].append(sid)
                await http.call("POST", f"/sandboxes/{sid}/commands", {"argv": ["true"]})
                t = time.perf_counter()
                await http.call("DELETE", f"/sandboxes/{sid}")
                now = time.perf_counter()
                out["delete"].append((now - t) * 1000)
                out["cycle"].append((now - t0) * 1000)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                out["errors"].append(repr(exc)[:200])
                await http.close()
                http = LeanClient(url, key)
    finally:
        await http.close()


def host_leftovers(config: HostConfig, ids: list[str]) -> tuple[int, int]:
    """(cgroups, broker directories) still on the host of the sandboxes this run made (others may run)."""
    root = Path("/sys/fs/cgroup") / config.cgroup_parent
    names = {p.name for p in root.rglob("sbx-*")} if root.is_dir() else set()
    net = config.state_dir / "net"
    brokers = {p.name for p in net.iterdir()} if net.is_dir() else set()
    return sum(1 for i in ids if i in names), sum(1 for i in ids if i in brokers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="10,30")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--network", choices=["allowlist", "none"], default="allowlist")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    sandbox_policy = policy().model_dump(mode="json")
    if args.network == "allowlist":
        sandbox_policy["network"] = {"mode": "allowlist", "allow": ["bench.example.test"]}
    body = {"policy": sandbox_policy}
    data_dir = Path(tempfile.mkdtemp(prefix="stockade-bench-reliability-"))
    config_file = data_dir / "server.toml"
    config_file.write_text(CONFIG.format(warm=0, policy=_toml_inline(policy().model_dump(mode="json"))))
    proc, url, key = start_server(data_dir, config_file, os.environ.get("STOCKADE_DATABASE_URL_BENCH"))
    host = HostConfig.from_env()
    rows: list[tuple[str, ...]] = []
    try:
        for level in (int(x) for x in args.levels.split(",")):
            out: dict[str, list[Any]] = {"delete": [], "cycle": [], "errors": [], "ids": []}

            async def run(n: int = level, o: dict[str, list[Any]] = out) -> None:
                until = time.monotonic() + args.seconds
                await asyncio.gather(*(client(url, key, body, until, o) for _ in range(n)))

            asyncio.run(run())
            time.sleep(2)  # the last kills' clean-up
            listed = len(httpx.get(f"{url}/sandboxes", headers={"Authorization": f"Bearer {key}"}).json())
            cgroups, brokers = host_leftovers(host, out["ids"])
            d, c = out["delete"] or [0.0], out["cycle"] or [0.0]
            rows.append((str(level), str(len(out["cycle"])), str(len(out["errors"])),
                         f"{pct(d, 50):.1f}", f"{pct(d, 95):.1f}", f"{pct(d, 99):.1f}",
                         f"{pct(c, 50):.1f}", f"{pct(c, 95):.1f}", f"{pct(c, 99):.1f}",
                         f"{listed}/{cgroups}/{brokers}"))
            for err in out["errors"][:3]:
                print(f"  error ({level} clients): {err}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"network.mode = {args.network}; {args.seconds:g} s per level; each cycle: create, exec `true`, kill")
    print_table(["clients", "cycles", "errors", "kill p50 ms", "kill p95 ms", "kill p99 ms", "cycle p50 ms",
                 "cycle p95 ms", "cycle p99 ms", "left: listed/cgroups/brokers"], rows, args.markdown)


if __name__ == "__main__":
    main()
