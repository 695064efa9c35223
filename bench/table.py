"""How every benchmark prints its results: the machine, then one row per measure (markdown for the README)."""

from __future__ import annotations

import os
import platform


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
