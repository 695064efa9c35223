"""`stockade run -- true` as a whole process, beside the interpreter's own start, same run.

    python bench/bench_cli.py [--runs 30] [--baseline DIR] [--markdown]

Times, as whole processes (fork + exec to exit, output discarded), interleaved run by run so load on the
machine hits every row alike:
- `python3 -I -S -c pass` (the floor: the interpreter without site-packages) and `python3 -c pass`;
- `python3 -c 'import stockade'` and `python3 -c 'import stockade.cli'` (what the command imports before
  it parses its arguments);
- `stockade run -- true`: a fresh sandbox, one command, teardown, the audit committed (`python3 -m
  stockade.cli`, the same code the `stockade` script runs);
- with --baseline DIR (a checkout of another commit, e.g. `git worktree add /tmp/base main`): the same
  command from DIR/src, for a before/after in the same run.
The target (issue 16) is `stockade run -- true` ≤ 150 ms p50. The audit goes to a throw-away database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import print_table, private_audit_store  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit to time beside this one")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    private_audit_store()
    py = sys.executable

    def env(src: Path) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(src)}

    here = env(SRC)
    cases: list[tuple[str, list[str], dict[str, str]]] = [
        ("python3 -I -S -c pass", [py, "-I", "-S", "-c", "pass"], here),
        ("python3 -c pass", [py, "-c", "pass"], here),
        ("python3 -c 'import stockade'", [py, "-c", "import stockade"], here),
        ("python3 -c 'import stockade.cli'", [py, "-c", "import stockade.cli"], here),
        ("stockade run -- true", [py, "-m", "stockade.cli", "run", "--", "true"], here),
    ]
    if args.baseline:
        base = env(args.baseline.resolve() / "src")
        cases += [
            ("baseline: python3 -c 'import stockade'", [py, "-c", "import stockade"], base),
            ("baseline: stockade run -- true", [py, "-m", "stockade.cli", "run", "--", "true"], base),
        ]
    for _, argv, e in cases:  # warm: bytecode compiled, the sandbox environment and caches in place
        timed(argv, e)
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.runs):
        for name, argv, e in cases:
            times[name].append(timed(argv, e))

    def p(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=10, method="inclusive")[q // 10 - 1] * 1000 if len(xs) > 1 else xs[0] * 1000

    floor = statistics.median(times["python3 -I -S -c pass"])
    rows = [(name, f"{statistics.median(xs) * 1000:.1f} ms", f"{p(xs, 90):.1f} ms",
             f"{statistics.median(xs) / floor:.1f}x") for name, xs in times.items()]
    print_table([f"whole process ({args.runs} runs, interleaved)", "p50", "p90", "vs python -I -S"], rows,
                args.markdown)


if __name__ == "__main__":
    main()
