"""How every benchmark prints its results: the machine, then one row per measure (markdown for the README)."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade import Policy


def machine() -> str:
    return (f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {'root' if os.geteuid() == 0 else 'unprivileged'}")


def print_table(columns: list[str], rows: list[tuple[str, ...]], markdown: bool) -> None:
    if markdown:
        print(f"Machine: {machine()}\n")
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(machine())
        for row in rows:
            print(f"{row[0]:<55} " + "  ".join(f"{cell:>12}" for cell in row[1:]))


def private_audit_store() -> None:
    """Benchmark sandboxes record to a throw-away audit database, not the host's (removed at exit)."""
    if "STOCKADE_DATABASE_URL" not in os.environ:
        tmp = tempfile.mkdtemp(prefix="stockade-bench-audit-")
        atexit.register(shutil.rmtree, tmp, True)
        os.environ["STOCKADE_DATABASE_URL"] = f"sqlite:///{tmp}/audit.db"


def bench_policy() -> Policy:
    """The default policy; an unprivileged run accepts the cgroup controls it cannot have. (stockade is
    imported here: the benchmark puts the tree's src/ on sys.path before it imports stockade.)"""
    from stockade import Policy

    return Policy.from_dict({} if os.geteuid() == 0 else {"allow_missing_controls": ["memory", "pids", "cpu"]})
