"""Code-interpreter benchmarks, each beside a baseline measured in the same run.

    python bench/bench_code.py [--runs 50] [--markdown]

- warm run_code("1+1") in a live context, against commands.run(["true"]) in the same sandbox;
- first run_code in a fresh sandbox (context start included; sandbox creation not included), against
  starting the same interpreter bare (the sandbox environment's python running one IPython cell).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import Sandbox  # noqa: E402
from stockade.config import HostConfig  # noqa: E402
from stockade.environment import is_built  # noqa: E402

BARE_CELL = ("from IPython.core.interactiveshell import InteractiveShell\n"
             "InteractiveShell.instance().run_cell('1+1')\n")


def pct(samples: list[float], p: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(len(samples) * p))]


def timed_ms(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    policy = bench_policy()
    env = HostConfig.from_env().sandbox_env
    rows = []

    with Sandbox.create(policy=policy) as sb:
        backend = sb.info().runtime["code_interpreter"]
        sb.run_code("1+1")
        warm = [timed_ms(lambda: sb.run_code("1+1")) for _ in range(args.runs * 4)]
        execs = [timed_ms(lambda: sb.commands.run(["true"])) for _ in range(args.runs * 4)]
    rows.append((f"warm run_code('1+1') ({backend})", f"{pct(warm, .5):.2f} ms", f"{pct(warm, .95):.2f} ms",
                 f"commands.run(['true']) in the same sandbox {pct(execs, .5):.2f} ms"))

    firsts = []
    for _ in range(max(10, args.runs // 3)):
        with Sandbox.create(policy=policy) as sb:
            firsts.append(timed_ms(lambda sb=sb: sb.run_code("1+1")))  # type: ignore[misc]
    if is_built(env):
        bare = [timed_ms(lambda: subprocess.run([str(env / "bin/python3"), "-c", BARE_CELL], check=True,
                                                stdout=subprocess.DEVNULL))
                for _ in range(max(10, args.runs // 3))]
        baseline = f"bare IPython start + one cell (no sandbox) {pct(bare, .5):.0f} ms"
    else:
        baseline = "(sandbox environment not built: stdlib fallback)"
    rows.append(("first run_code in a fresh sandbox (context start)", f"{pct(firsts, .5):.0f} ms",
                 f"{pct(firsts, .95):.0f} ms", baseline))

    print_table(["measure", "p50", "p95", "baseline (same run)"], rows, args.markdown)

if __name__ == "__main__":
    main()
