"""What the workspace venv (/home/user/.local, environment.workspace_venv) costs a sandbox's start, beside
its baseline measured in the same run: Sandbox.create() + commands.run("true") + kill with the venv's
files placed, and the same start with an empty layout (nothing placed), interleaved so both see the same
machine load.

    python bench/bench_pip.py [--runs 40] [--markdown]

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import bench_policy, print_table, private_audit_store  # noqa: E402

from stockade import Sandbox, environment  # noqa: E402
from stockade.config import HostConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    private_audit_store()
    env = HostConfig.from_env().sandbox_env
    if not environment.is_built(env):
        sys.exit(f"the sandbox environment {env} is not built (stockade env build): no workspace venv to measure")
    real = environment.workspace_venv
    layouts = {"with the workspace venv": real(env), "baseline: nothing placed": environment.VenvLayout((), (), ())}
    policy = bench_policy()
    samples: dict[str, list[float]] = {name: [] for name in layouts}
    try:
        Sandbox.create(policy=policy).kill()  # caches (agent archive, seccomp filter) built before timing
        for _ in range(args.runs):
            for name, layout in layouts.items():
                environment.workspace_venv = lambda _env, layout=layout: layout  # type: ignore[misc]
                t = time.perf_counter()
                sb = Sandbox.create(policy=policy)
                sb.commands.run("true")
                samples[name].append((time.perf_counter() - t) * 1000)
                sb.kill()
    finally:
        environment.workspace_venv = real  # type: ignore[misc]
    rows = []
    for name, values in samples.items():
        values.sort()
        rows.append((name, f"{len(layouts[name].files)} files", f"{statistics.median(values):.1f} ms",
                     f"{values[min(len(values) - 1, int(len(values) * 0.9))]:.1f} ms"))
    print_table(["create + run('true')", "placed", "p50", "p90"], rows, args.markdown)


if __name__ == "__main__":
    main()
