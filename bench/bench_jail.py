"""Benchmarks for the jail runtime, each beside its baseline measured in the same run.

    python bench/bench_jail.py [--runs 100] [--idle 300] [--markdown]

- cold start: Sandbox.create() + commands.run("true") against a bare subprocess and a bare bwrap run
  (same namespaces, no policy, no agent);
- exec round trip in a live sandbox against a bare fork+exec of the same command;
- create+destroy throughput;
- host memory per idle sandbox with N alive: the PSS of each sandbox's host processes (bwrap and the
  agent) plus this process's own growth, and the cgroup's charge (page tables, tmpfs, kernel memory);
  and the exec round trip with all N alive (the host still serving).

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import Sandbox  # noqa: E402
from stockade.runtime.jail import bwrap as bwrap_mod  # noqa: E402


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return sorted(out)


def pct(samples: list[float], p: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * p))]


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    policy = bench_policy()
    bwrap = bwrap_mod.locate().path
    bare_bwrap = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
                  "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
                  "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]

    Sandbox.create(policy=policy).kill()  # warm the process: runtime probe, compiled agent
    rows: list[tuple[str, str, str, str]] = []

    # cold start
    def cold() -> None:
        sb = Sandbox.create(policy=policy)
        sb.commands.run("true")
        sb.kill()

    base_sub = timed(lambda: subprocess.run(["/bin/true"]), args.runs)
    base_bwrap = timed(lambda: subprocess.run(bare_bwrap), args.runs)
    cold_starts = []
    for _ in range(args.runs):  # kill outside the timing: the target is create + first result
        t = time.perf_counter()
        sb = Sandbox.create(policy=policy)
        sb.commands.run("true")
        cold_starts.append((time.perf_counter() - t) * 1000)
        sb.kill()
    cold_starts.sort()
    rows.append(("cold create + run('true')", f"{pct(cold_starts, .5):.1f} ms", f"{pct(cold_starts, .95):.1f} ms",
                 f"bare subprocess {pct(base_sub, .5):.1f} ms, bare bwrap {pct(base_bwrap, .5):.1f} ms "
                 f"(x{pct(cold_starts, .5) / pct(base_bwrap, .5):.1f} of bare bwrap)"))

    # exec round trip
    with Sandbox.create(policy=policy) as sb:
        sb.commands.run(["true"])
        execs = timed(lambda: sb.commands.run(["true"]), args.runs * 5)
        shell = timed(lambda: sb.commands.run("true"), args.runs)
    bare = timed(lambda: subprocess.run(["/bin/true"]), args.runs * 5)
    rows.append(("exec round trip run(['true'])", f"{pct(execs, .5):.2f} ms", f"{pct(execs, .95):.2f} ms",
                 f"bare fork+exec {pct(bare, .5):.2f} ms: +{pct(execs, .5) - pct(bare, .5):.2f} ms"))
    rows.append(("exec round trip run('true') via /bin/sh", f"{pct(shell, .5):.2f} ms", f"{pct(shell, .95):.2f} ms",
                 ""))

    # throughput
    n = max(20, args.runs // 2)
    t = time.perf_counter()
    for _ in range(n):
        Sandbox.create(policy=policy).kill()
    rate = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n):
        subprocess.run(bare_bwrap)
    bare_rate = n / (time.perf_counter() - t)
    rows.append(("create+destroy throughput", f"{rate:.0f} /s", "", f"bare bwrap run {bare_rate:.0f} /s"))

    # idle memory
    me = os.getpid()
    before_rss = rss_kib(me)
    sandboxes = []
    try:
        for _ in range(args.idle):
            sandboxes.append(Sandbox.create(policy=policy, timeout=600))
        time.sleep(1)
        infos = [sb.info() for sb in sandboxes]
        agents = {i.runtime["agent_host_pid"] for i in infos}
        bwraps = [p for p in children_of(me) if p not in agents]
        process_pss = sum(pss_kib(p) for p in list(agents) + bwraps)
        host_growth = max(0, rss_kib(me) - before_rss)
        charges = []
        for i in infos:
            f = Path("/sys/fs/cgroup/memory/stockade") / i.sandbox_id / "memory.usage_in_bytes"
            if f.exists():
                charges.append(int(f.read_text()) / 1024)
        per = (process_pss + host_growth) / len(sandboxes) / 1024
        extra = f", cgroup charge {statistics.mean(charges) / 1024:.1f} MiB each" if charges else ""
        rows.append((f"host memory per idle sandbox ({len(sandboxes)} alive)", f"{per:.1f} MiB", "",
                     f"processes PSS {process_pss / 1024:.0f} MiB + SDK process {host_growth / 1024:.0f} MiB"
                     f"{extra}"))
        # the host still serving: exec round trips in the newest and oldest sandbox with all of them alive
        busy = []
        for sb in (sandboxes[0], sandboxes[-1]) * 20:
            t = time.perf_counter()
            sb.commands.run(["true"])
            busy.append((time.perf_counter() - t) * 1000)
        busy.sort()
        rows.append((f"exec round trip run(['true']) with {len(sandboxes)} alive", f"{busy[len(busy) // 2]:.2f} ms",
                     f"{busy[int(len(busy) * .95)]:.2f} ms", "the same measure above: with none alive"))
    finally:
        for sb in sandboxes:
            sb.kill()

    print_table(["measure", "p50", "p95", "baseline (same run)"], rows, args.markdown)

if __name__ == "__main__":
    main()
