"""Cold start from a template beside today's host-root cold start, measured in the same run, interleaved.

    python bench/bench_template_start.py [--runs 50] [--markdown]

Each sample is Sandbox.create() + the first commands.run(["/bin/sh", "-c", ":"]) (the kill is outside
the timing). The template is built here: 3 layers (the host's dash and its C library; a layer of small
files; a layer with a whiteout), imported into the host's store under a throw-away name and removed at the
end. Issue 12's target: template p50 <= 1.5x the host-root p50 and <= 40 ms.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
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
from stockade.templates import TemplateStore, import_image  # noqa: E402


def _host(path: str) -> bytes:
    return Path(os.path.realpath(path)).read_bytes()


def layers() -> list[bytes]:
    base = ti.layer(
        ti.entry("dir", "bin"), ti.entry("file", "bin/sh", _host("/bin/dash"), mode=0o755),
        ti.entry("dir", "lib"), ti.entry("dir", "lib/x86_64-linux-gnu"),
        ti.entry("file", "lib/x86_64-linux-gnu/libc.so.6", _host("/lib/x86_64-linux-gnu/libc.so.6"), mode=0o755),
        ti.entry("dir", "lib64"),
        ti.entry("file", "lib64/ld-linux-x86-64.so.2", _host("/lib64/ld-linux-x86-64.so.2"), mode=0o755),
        ti.entry("dir", "etc"), ti.entry("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n"))
    files = ti.layer(ti.entry("dir", "srv"), *(ti.entry("file", f"srv/f{i}", b"x" * 1000) for i in range(200)))
    top = ti.layer(ti.entry("dir", "srv"), ti.entry("file", "srv/.wh.f0"), ti.entry("file", "srv/app", b"app\n"))
    return [base, files, top]


def pct(samples: list[float], p: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * p))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    private_audit_store()
    policy = bench_policy()
    store = TemplateStore()
    name = f"bench-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        ti.oci_layout(Path(tmp), layers(), Env=["PATH=/bin"])
        import_image(store, name, f"oci:{tmp}")
    try:
        for template in (None, name):  # warm the process: runtime probe, compiled agent, host python copy
            Sandbox.create(policy=policy, template=template).kill()
        samples: dict[str | None, list[float]] = {None: [], name: []}
        for _ in range(args.runs):
            for template in (None, name):
                t = time.perf_counter()
                sb = Sandbox.create(policy=policy, template=template)
                sb.commands.run(["/bin/sh", "-c", ":"])
                samples[template].append((time.perf_counter() - t) * 1000)
                sb.kill()
    finally:
        store.remove(name)
    host, tpl = sorted(samples[None]), sorted(samples[name])
    rows = [("host root: create + first exec", f"{pct(host, .5):.1f} ms", f"{pct(host, .95):.1f} ms",
             f"mean {statistics.mean(host):.1f} ms"),
            ("template (3 layers): create + first exec", f"{pct(tpl, .5):.1f} ms", f"{pct(tpl, .95):.1f} ms",
             f"x{pct(tpl, .5) / pct(host, .5):.2f} of host root p50 (target <= 1.5x and <= 40 ms)")]
    print_table(["what", "p50", "p95", "baseline / note"], rows, args.markdown)


if __name__ == "__main__":
    main()
