"""The gvisor runtime against bare runsc and against the jail, measured in the same run (root only).

    python bench/bench_gvisor.py [--runs 20] [--idle 5] [--markdown]

- cold start: Sandbox.create(runtime=...) + the first commands.run(["/bin/true"]), against a bare `runsc run`
  of the same bundle (stockade's own config.json, its process replaced by /bin/true, same flags and
  platform) and a bare `runsc do true`;
- exec round trip: commands.run(["/bin/true"]) in a live sandbox, against `runsc exec <id> /bin/true` into a
  bare container of the same bundle, and the jail's;
- idle memory: the memory cgroup's usage of each of N live sandboxes, against N bare containers of the same
  bundle running `sleep`, and the jail's;
- create + destroy throughput, sequential, against the jail.
Broker throughput per runtime: bench/bench_network.py --runtime jail,gvisor. Issue 13's targets: cold start
<= 1.3x bare runsc, exec <= the jail's + 2 ms, idle memory <= 1.2x a bare container's.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import Sandbox  # noqa: E402
from stockade.runtime import cgroups  # noqa: E402
from stockade.runtime.gvisor import bundle as bundle_mod  # noqa: E402
from stockade.runtime.gvisor import runsc as runsc_mod  # noqa: E402
from stockade.runtime.gvisor.runtime import GvisorRuntime  # noqa: E402


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms"


def mib(samples: list[int]) -> str:
    return f"{statistics.mean(samples) / (1 << 20):.1f} MiB"


def usage(host: cgroups.CgroupHost, name: str) -> int:
    d = host.parents["memory"] / name
    for f in ("memory.current", "memory.usage_in_bytes"):
        if (d / f).exists():
            return int((d / f).read_text())
    raise SystemExit(f"no memory usage file in {d}")


class Bare:
    """Bare runsc containers of stockade's own bundle, under a private --root, each in a cgroup of its own."""

    def __init__(self, rt: GvisorRuntime, tmp: Path) -> None:
        self.rt, self.tmp = rt, tmp
        self.flags = [rt.runsc.path, "--root", str(tmp / "root"), *rt.flags[3:]]
        self.n = 0

    def bundle(self, args: list[str]) -> tuple[str, Path]:
        self.n += 1
        name = f"stockade-bench-{os.getpid()}-{self.n}"
        b = self.tmp / name
        b.mkdir()
        policy = bench_policy()
        bundle_mod.write(b, policy=policy, layout=self.rt.layout, static=self.rt.static, image=self.rt.image,
                         sandbox_env=self.rt.sandbox_env, egress_dir=None, files={},
                         cgroups_path=f"/{self.rt.cgroup_parent}/{name}", host_pids=policy.limits.pids + 512,
                         cpus=[0], channel_fd=3, mounts_checked=[])
        config = json.loads((b / "config.json").read_text())
        config["process"].update(args=args, user={"uid": 1000, "gid": 1000})
        (b / "config.json").write_text(json.dumps(config))
        return name, b

    def run(self, args: list[str], detach: bool = False) -> str:
        name, b = self.bundle(args)
        subprocess.run([*self.flags, "run", *(["--detach"] if detach else []), "--bundle", str(b), name],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return name

    def delete(self, name: str) -> None:
        subprocess.run([*self.flags, "delete", "--force", name], check=False)
        for d in Path("/sys/fs/cgroup").glob(f"*/{self.rt.cgroup_parent}/{name}"):
            d.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--idle", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the gvisor runtime needs root")
    private_audit_store()
    rt = GvisorRuntime()
    host = cgroups.detect(rt.cgroup_parent)
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-gvisor-"))
    bare = Bare(rt, tmp)
    try:
        rows = run(args, rt, host, bare)
    finally:
        runsc_mod.unmount_null_netns(tmp / "root")
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(["measure", "gvisor", "baseline (same run)"], rows, args.markdown)
    print(f"\nrunsc: {rt.runsc.path} ({rt.runsc.version}), platform {rt.runsc.platform}")


def run(args: argparse.Namespace, rt: GvisorRuntime, host: cgroups.CgroupHost, bare: Bare) -> list[tuple[str, ...]]:
    policy = bench_policy()
    cold: dict[str, list[float]] = {"gvisor": [], "jail": [], "bare run": [], "bare do": []}
    for _ in range(args.runs):  # interleaved, so load on the shared machine hits all alike
        for runtime in ("gvisor", "jail"):
            t = time.perf_counter()
            sb = Sandbox.create(policy=policy, runtime=runtime)
            sb.commands.run(["/bin/true"])
            cold[runtime].append(time.perf_counter() - t)
            sb.kill()
        name, b = bare.bundle(["/bin/true"])
        t = time.perf_counter()
        subprocess.run([*bare.flags, "run", "--bundle", str(b), name], check=True, stdin=subprocess.DEVNULL)
        cold["bare run"].append(time.perf_counter() - t)
        bare.delete(name)
        t = time.perf_counter()
        subprocess.run([*bare.flags, "--ignore-cgroups", "do", "true"], check=True, cwd="/")
        cold["bare do"].append(time.perf_counter() - t)

    execs: dict[str, list[float]] = {"gvisor": [], "jail": [], "bare exec": []}
    live = {r: Sandbox.create(policy=policy, runtime=r) for r in ("gvisor", "jail")}
    container = bare.run(["/bin/sleep", "1000"], detach=True)
    try:
        for _ in range(args.runs * 5):
            for r, sb in live.items():
                t = time.perf_counter()
                sb.commands.run(["/bin/true"])
                execs[r].append(time.perf_counter() - t)
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([*bare.flags, "exec", container, "/bin/true"], check=True)
            execs["bare exec"].append(time.perf_counter() - t)
    finally:
        for sb in live.values():
            sb.kill()
        bare.delete(container)

    idle: dict[str, list[int]] = {"gvisor": [], "jail": [], "bare": []}
    for r in ("gvisor", "jail"):
        alive = [Sandbox.create(policy=policy, runtime=r) for _ in range(args.idle)]
        time.sleep(1)
        idle[r] = [usage(host, sb.sandbox_id) for sb in alive]
        for sb in alive:
            sb.kill()
    names = [bare.run(["/bin/sleep", "1000"], detach=True) for _ in range(args.idle)]
    time.sleep(1)
    idle["bare"] = [usage(host, n) for n in names]
    for n in names:
        bare.delete(n)

    rate: dict[str, float] = {}
    for r in ("gvisor", "jail"):
        t = time.perf_counter()
        for _ in range(args.runs):
            Sandbox.create(policy=policy, runtime=r).kill()
        rate[r] = args.runs / (time.perf_counter() - t)

    g, j = statistics.median(cold["gvisor"]), statistics.median(cold["bare run"])
    exec_gap = (statistics.median(execs["gvisor"]) - statistics.median(execs["jail"])) * 1000
    memory_ratio = statistics.mean(idle["gvisor"]) / statistics.mean(idle["bare"])
    return [
        (f"cold create + first exec, p50 of {args.runs}", ms(cold["gvisor"]),
         f"bare runsc run {ms(cold['bare run'])} (x{g / j:.2f}); bare runsc do {ms(cold['bare do'])}; "
         f"jail {ms(cold['jail'])}"),
        ("exec round trip (/bin/true), p50", ms(execs["gvisor"]),
         f"jail {ms(execs['jail'])} (+{exec_gap:.1f} ms); bare runsc exec {ms(execs['bare exec'])}"),
        (f"memory per idle sandbox (cgroup usage, {args.idle} alive)", mib(idle["gvisor"]),
         f"bare runsc container {mib(idle['bare'])} (x{memory_ratio:.2f}); jail {mib(idle['jail'])}"),
        (f"create + destroy, sequential ({args.runs})", f"{rate['gvisor']:.1f}/s", f"jail {rate['jail']:.1f}/s"),
    ]


if __name__ == "__main__":
    main()
