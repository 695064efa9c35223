"""What the disk workspace costs: cold start with /home/user and /tmp as ext4 images beside the tmpfs
workspace, measured in the same run, interleaved; and the images' own set-up and teardown beside the
util-linux way (mkfs.ext4 per image, ``mount -o loop``, ``umount``).

    python bench/bench_workspace.py [--runs 40] [--markdown]      (as root: images need loop devices)

Cold start: two worker processes, one with STOCKADE_WORKSPACE=tmpfs and one with the default (disk images
as root), take turns; each sample is Sandbox.create() + the first commands.run(":"), then the kill, timed
apart. Images: DiskWorkspace.create() + remove() (two images: a blank copied, a loop device by ioctl,
mount(2)) against two mkfs.ext4 + ``mount -o loop`` + ``umount`` runs of the same sizes, alternating.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import print_table, private_audit_store  # noqa: E402

WORKER = """
import sys, time
sys.path[:0] = {path!r}
from table import bench_policy
from stockade import Sandbox
policy = bench_policy()
Sandbox.create(policy=policy).kill()   # warm: runtime probe, compiled agent, blank images
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    sb = Sandbox.create(policy=policy)
    sb.commands.run(":")
    t1 = time.perf_counter()
    backing = sb.info().runtime["workspace_backing"]
    t2 = time.perf_counter()
    sb.kill()
    t3 = time.perf_counter()
    print(f"{{(t1 - t) * 1000:.3f}} {{(t3 - t2) * 1000:.3f}} {{backing.replace(' ', '_')}}", flush=True)
"""


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


def cold_start(runs: int) -> dict[str, tuple[list[float], list[float], str]]:
    code = WORKER.format(path=[str(ROOT / "src"), str(Path(__file__).resolve().parent)])
    workers = {}
    for mode in ("tmpfs", "auto"):
        env = {**os.environ, "STOCKADE_WORKSPACE": mode}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        workers[mode] = proc
    out: dict[str, tuple[list[float], list[float], str]] = {m: ([], [], "") for m in workers}
    try:
        for _ in range(runs):
            for mode, proc in workers.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                start, kill, backing = proc.stdout.readline().split()
                out[mode][0].append(float(start))
                out[mode][1].append(float(kill))
                out[mode] = (out[mode][0], out[mode][1], backing.replace("_", " "))
    finally:
        for proc in workers.values():
            if proc.stdin:
                proc.stdin.close()
            proc.wait(60)
    return out


def images(runs: int) -> tuple[list[float], list[float]]:
    from stockade.config import HostConfig
    from stockade.runtime.jail import workspace

    config = HostConfig.from_env()
    sizes = (1 << 30, 256 << 20)
    ours, util = [], []
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-ws-", dir=config.data_dir))
    try:
        for i in range(runs):
            t = time.perf_counter()
            ws = workspace.DiskWorkspace(config.state_dir, config.data_dir, f"bench-{secrets.token_hex(6)}",
                                         65534, *sizes)
            ws.create(overlay=False)
            ws.remove()
            ours.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            for n, size in enumerate(sizes):
                img, mnt = tmp / f"{i}-{n}.img", tmp / f"{i}-{n}"
                mnt.mkdir()
                with open(img, "wb") as f:
                    f.truncate(size)
                subprocess.run([workspace.mkfs_path() or "mkfs.ext4", *workspace.MKFS_OPTIONS, str(img)], check=True)
                subprocess.run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime,noinit_itable", str(img),
                                str(mnt)], check=True)
            for n in range(len(sizes)):
                subprocess.run(["umount", str(tmp / f"{i}-{n}")], check=True)
                (tmp / f"{i}-{n}.img").unlink()
            util.append((time.perf_counter() - t) * 1000)
    finally:
        for mnt in tmp.iterdir():
            if os.path.ismount(mnt):
                subprocess.run(["umount", str(mnt)])
        shutil.rmtree(tmp, ignore_errors=True)
    return ours, util


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    res = cold_start(args.runs)
    (t_start, t_kill, t_back), (d_start, d_kill, d_back) = res["tmpfs"], res["auto"]
    rows = [(f"create + first exec, workspace {t_back}", f"{pct(t_start, .5):.1f} ms", f"{pct(t_start, .95):.1f} ms",
             f"mean {statistics.mean(t_start):.1f} ms (baseline)"),
            (f"create + first exec, workspace {d_back}", f"{pct(d_start, .5):.1f} ms", f"{pct(d_start, .95):.1f} ms",
             f"{pct(d_start, .5) - pct(t_start, .5):+.1f} ms p50 against tmpfs"),
            (f"kill, workspace {t_back}", f"{pct(t_kill, .5):.1f} ms", f"{pct(t_kill, .95):.1f} ms", "baseline"),
            (f"kill, workspace {d_back}", f"{pct(d_kill, .5):.1f} ms", f"{pct(d_kill, .95):.1f} ms",
             f"{pct(d_kill, .5) - pct(t_kill, .5):+.1f} ms p50 against tmpfs")]
    if os.geteuid() == 0:
        ours, util = images(args.runs)
        rows += [("two images (1 GiB + 256 MiB): util-linux mkfs + mount -o loop + umount", f"{pct(util, .5):.1f} ms",
                  f"{pct(util, .95):.1f} ms", "baseline"),
                 ("two images: blank copy + LOOP_CONFIGURE + mount(2) + umount2", f"{pct(ours, .5):.1f} ms",
                  f"{pct(ours, .95):.1f} ms", f"x{pct(ours, .5) / pct(util, .5):.2f} of util-linux p50")]
    print_table(["what", "p50", "p95", "baseline / note"], rows, args.markdown)


if __name__ == "__main__":
    main()
