"""A snapshot of a template sandbox that wrote --mib MiB, against a bare copy of the same files, same run.

    python bench/bench_snapshot.py [--mib 100] [--runs 3] [--markdown]      (as root: snapshots need it)

Each run: a sandbox from a small template writes --mib MiB (a few large files, 1/3 random bytes, and
1,000 small ones) into /home/node, then:
- ``sb.snapshot()`` is timed (the walk by descriptor, the layer tar, its digest, the checked extraction,
  the os.sync() before the layer is renamed into place, the template record);
- the baseline: ``tar -cf - UPPER | tar -xf - -C DIR`` of the sandbox's writable layer into a fresh
  directory on the same disk, then ``sync`` (no checks, no digest).
Issue 12's target: a snapshot of a sandbox that wrote 100 MiB in <= 2 s.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402
from tests import template_images as ti  # noqa: E402

from stockade import Sandbox  # noqa: E402
from stockade.config import HostConfig  # noqa: E402
from stockade.runtime.registry import runtime_class  # noqa: E402
from stockade.templates import TemplateStore, import_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    private_audit_store()
    store = TemplateStore()
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-snap-"))
    base = f"bench-snapbase-{int(time.time())}"
    ti.oci_layout(work / "img", [*ti.user_image_layers(), ti.tools_layer("head", "seq", "mkdir")],
                  Env=["PATH=/usr/bin:/bin"], User="node")
    import_image(store, base, f"oci:{work / 'img'}")
    made: list[str] = []
    snap_s: list[float] = []
    copy_s: list[float] = []
    third = args.mib // 3
    script = (f"head -c {third}M /dev/urandom > /home/node/random && "
              f"head -c {args.mib - third - 4}M /dev/zero > /home/node/zeros && "
              "mkdir /home/node/small && for i in $(seq 1000); do head -c 4096 /dev/zero > /home/node/small/$i; done")
    try:
        for _ in range(args.runs):
            with Sandbox.create(policy=bench_policy(), template=base) as sb:
                r = sb.commands.run(["/bin/sh", "-c", script], timeout=120)
                assert r.exit_code == 0, r.stderr
                state = HostConfig.from_env().state_dir   # the writable layer: on the workspace image, or not
                upper_dir = next(p for p in (state / "workspace" / sb.sandbox_id / "disk" / "upper",
                                             runtime_class("jail")().overlay_dir / sb.sandbox_id / "upper")
                                 if p.is_dir())
                dest = store.root / "tmp" / f"bench-copy-{sb.sandbox_id}"
                dest.mkdir()
                started = time.perf_counter()
                subprocess.run(f"tar -cf - -C {upper_dir} . | tar -xf - -C {dest} && sync", shell=True, check=True)
                copy_s.append(time.perf_counter() - started)
                shutil.rmtree(dest)
                started = time.perf_counter()
                made.append(sb.snapshot())
                snap_s.append(time.perf_counter() - started)
    finally:
        for name in [*made, base]:
            if store.exists(name):
                store.remove(name)
        shutil.rmtree(work, ignore_errors=True)
    rows = [(f"sb.snapshot() of {args.mib} MiB", f"{statistics.median(snap_s):.2f} s", f"{max(snap_s):.2f} s"),
            ("tar -c | tar -x of its writable layer + sync", f"{statistics.median(copy_s):.2f} s",
             f"{max(copy_s):.2f} s")]
    print_table(["measure", f"median of {args.runs}", "max"], rows, args.markdown)


if __name__ == "__main__":
    main()
