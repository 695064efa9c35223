"""The official E2B Python SDK through stockade's E2B front end, beside stockade's own remote SDK, against
the same `stockade serve` (its own process) in the same run.

    python bench/bench_e2b.py [--rounds 5] [--n 20] [--markdown]

Measured, one client, sequentially: `commands.run("true")` round trip, `run_code("1+1")` round trip, and
create + kill. Each round runs each workload with the native SDK then with E2B's, so drift hits both.
E2B's commands.run sends `/bin/bash -l -c true` (a login shell, as its SDK does); the native one runs
`true` through `/bin/sh -c`. Measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import _toml_inline, policy, start_server  # noqa: E402
from table import print_table, private_audit_store  # noqa: E402

from stockade import Sandbox  # noqa: E402

CONFIG = """
[server]
e2b_policy = {policy}

[tenant_defaults]
max_sandboxes = 100
rate_limit = 100000
rate_burst = 100000
"""


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20, help="calls per workload per round")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    data_dir = Path(tempfile.mkdtemp(prefix="stockade-bench-e2b-"))
    config = data_dir / "server.toml"
    config.write_text(CONFIG.format(policy=_toml_inline(policy().model_dump(mode="json"))))
    proc, url, key = start_server(data_dir, config, None)
    os.environ.update(E2B_API_URL=url + "/e2b", E2B_SANDBOX_URL=url + "/e2b/sandbox", E2B_API_KEY=key)
    from e2b_code_interpreter import Sandbox as E2BSandbox

    results: dict[str, list[float]] = {k: [] for k in (
        "native run", "e2b run", "native code", "e2b code", "native create", "e2b create")}
    try:
        native = Sandbox.create(policy(), api_url=url, api_key=key)
        e2b = E2BSandbox.create()
        native.commands.run("true")
        e2b.commands.run("true")
        native.run_code("1+1")
        e2b.run_code("1+1")  # both contexts started before anything is timed
        for _ in range(args.rounds):
            results["native run"] += timed(lambda: native.commands.run("true"), args.n)
            results["e2b run"] += timed(lambda: e2b.commands.run("true"), args.n)
            results["native code"] += timed(lambda: native.run_code("1+1"), args.n)
            results["e2b code"] += timed(lambda: e2b.run_code("1+1"), args.n)
            results["native create"] += timed(lambda: Sandbox.create(policy(), api_url=url, api_key=key).kill(),
                                               max(1, args.n // 4))
            results["e2b create"] += timed(lambda: E2BSandbox.create().kill(), max(1, args.n // 4))
        native.kill()
        e2b.kill()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)
    rows = []
    for what, label in (("run", 'commands.run("true")'), ("code", 'run_code("1+1")'), ("create", "create + kill")):
        nat, e = statistics.median(results[f"native {what}"]), statistics.median(results[f"e2b {what}"])
        rows.append((label, f"{nat:.2f}", f"{e:.2f}", f"{e / nat:.2f}x", f"{e - nat:+.2f}",
                     str(len(results[f"e2b {what}"]))))
    print_table(["workload", "native SDK p50 ms", "E2B SDK p50 ms", "ratio", "difference ms", "calls each"],
                rows, args.markdown)


if __name__ == "__main__":
    main()
