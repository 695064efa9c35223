"""Cold start from a template beside today's host-root cold start, measured in the same run, interleaved.

    python bench/bench_template_start.py [--runs 50] [--markdown] [--server]

Each sample is Sandbox.create() + the first commands.run(["/bin/sh", "-c", ":"]) (the kill is outside
the timing). The template is built here: 3 layers (the host's dash and its C library; a layer of small
files; a layer with a whiteout), imported into the host's store under a throw-away name and removed at the
end. Issue 12's target: template p50 <= 1.5x the host-root p50 and <= 40 ms.

``--server`` measures through a `stockade serve` (in this process, over HTTP, the remote SDK) whose store
holds the template and which keeps a warm pool of it (``warm_pools``): a create that the pool serves,
beside a cold one of the same template through the same server (a policy one pid apart, which the pool
does not match), interleaved; the pool has refilled before each warm sample (not timed).

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


def through_a_server(runs: int, markdown: bool) -> None:
    import dataclasses
    import shutil

    from tests.server_support import RunningServer
    from tests.waiting import wait_until

    from stockade.config import HostConfig
    from stockade.runtime.jail.runtime import JailRuntime
    from stockade.sdk.transports.remote import RemoteTransport

    data = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    data.chmod(0o755)
    name = f"bench-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        ti.oci_layout(Path(tmp), layers(), Env=["PATH=/bin"])
        import_image(TemplateStore(data / "templates"), name, f"oci:{tmp}")
    warm_policy = bench_policy()
    cold_policy = warm_policy.model_copy(update={"limits": warm_policy.limits.model_copy(
        update={"pids": warm_policy.limits.pids + 1})})
    runtime = JailRuntime(dataclasses.replace(HostConfig.from_env(), data_dir=data))
    server = RunningServer(data_dir=data, runtime=runtime, warm_pool=1, warm_pools={name: 1},
                           warm_pool_policy=warm_policy.model_dump(mode="json"))
    pools = server.server.manager.pools  # type: ignore[union-attr]
    samples: dict[str, list[float]] = {"warm": [], "cold": [], "host": []}
    try:
        transport = RemoteTransport(server.url, server.key("bench"))
        for _ in range(runs + 1):
            for kind, policy, template in (("warm", warm_policy, name), ("cold", cold_policy, name),
                                           ("host", warm_policy, None)):
                if kind != "cold":
                    wait_until(lambda: all(len(p.ready) == 1 for p in pools.values()), 60,
                               "the warm pools to refill")
                t = time.perf_counter()
                sb = Sandbox.create(policy=policy, template=template, transport=transport)
                sb.commands.run(["/bin/sh", "-c", ":"])
                samples[kind].append((time.perf_counter() - t) * 1000)
                sb.kill()
    finally:
        server.stop()
        TemplateStore(data / "templates").remove(name)
        shutil.rmtree(data, ignore_errors=True)
    warm, cold, host = (sorted(samples[k][1:]) for k in ("warm", "cold", "host"))  # the first warms up
    rows = [("server, template cold: create + first exec", f"{pct(cold, .5):.1f} ms", f"{pct(cold, .95):.1f} ms",
             "same server, a policy the pool does not match"),
            ("server, template from its warm pool", f"{pct(warm, .5):.1f} ms", f"{pct(warm, .95):.1f} ms",
             f"x{pct(warm, .5) / pct(cold, .5):.2f} of cold p50"),
            ("server, host root from its warm pool", f"{pct(host, .5):.1f} ms", f"{pct(host, .95):.1f} ms",
             "the pool that existed before, same server")]
    print_table(["what", "p50", "p95", "baseline / note"], rows, markdown)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--server", action="store_true", help="a server's warm pool of the template against cold")
    args = ap.parse_args()
    private_audit_store()
    if args.server:
        through_a_server(args.runs, args.markdown)
        return
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
