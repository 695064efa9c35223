"""`stockade template build`: a build of --steps RUN steps, a rebuild with only the last line changed, and a
rebuild with nothing changed, against the same commands in plain template sandboxes, same run.

    python bench/bench_build.py [--steps 5] [--runs 3] [--markdown]      (as root: build steps need it)

The file: FROM a small test template, then --steps RUN lines that each write a 1 MiB file (the last
line carries the run's number, so each "last line changed" rebuild has one new step). The baseline: each
RUN's command in a fresh ``Sandbox.create(template=...)`` with one ``commands.run`` and the kill (what a
step costs without its snapshot, its id block and its cache record). Issue 12's requirement: a rebuild
that changed only the last line costs only that line.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
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
from stockade.templates.build import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    private_audit_store()
    store = TemplateStore()
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-build-"))
    stamp = int(time.time())
    base, name = f"bench-buildbase-{stamp}", f"bench-built-{stamp}"
    ti.oci_layout(work / "img", [*ti.user_image_layers(), ti.tools_layer("head")], Env=["PATH=/usr/bin:/bin"],
                  User="node", WorkingDir="/home/node")
    import_image(store, base, f"oci:{work / 'img'}")
    commands = [f"head -c 1M /dev/zero > /home/node/f{i}" for i in range(args.steps)]
    full: list[float] = []
    last: list[float] = []
    cached: list[float] = []
    plain: list[float] = []
    try:
        for run in range(args.runs):
            lines = [f"FROM {base}", f"ENV RUN={stamp}-{run}", *[f"RUN {c}" for c in commands]]
            started = time.perf_counter()
            build(store, name, "\n".join(lines), work)
            full.append(time.perf_counter() - started)
            lines[-1] += f" # {run}"
            started = time.perf_counter()
            build(store, name, "\n".join(lines), work)
            last.append(time.perf_counter() - started)
            started = time.perf_counter()
            build(store, name, "\n".join(lines), work)
            cached.append(time.perf_counter() - started)
            started = time.perf_counter()
            for command in commands:
                with Sandbox.create(policy=bench_policy(), template=base) as sb:
                    assert sb.commands.run(["/bin/sh", "-c", command]).exit_code == 0
            plain.append(time.perf_counter() - started)
    finally:
        if store.exists(name):
            store.remove(name)
        store.remove(base)
        store.prune_build_cache()
        store.gc()
        shutil.rmtree(work, ignore_errors=True)

    def row(label: str, values: list[float]) -> tuple[str, str, str]:
        return label, f"{statistics.median(values):.2f} s", f"{max(values):.2f} s"

    print_table(["measure", f"median of {args.runs}", "max"], [
        row(f"build of {args.steps} RUN steps (nothing cached)", full),
        row("rebuild, last line changed", last),
        row("rebuild, nothing changed", cached),
        row(f"baseline: the {args.steps} commands in plain template sandboxes", plain),
    ], args.markdown)


if __name__ == "__main__":
    main()
