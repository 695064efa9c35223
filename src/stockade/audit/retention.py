"""Audit retention for short-lived processes: prune at most once per interval, not at every start.

A `stockade run` opens the audit store, records one sandbox's events and exits; deleting the events past
their retention at every start costs a DELETE over the table (~10 ms) on every one-shot run. A stamp file
beside the database records the cut-off of the last prune; a new prune runs when its cut-off would be
INTERVAL past that one (or the retention was shortened past it). So no event is ever kept longer than
``retention + INTERVAL``, which is the cadence the server's own pruner runs at (reaper_interval, an hour
by default); nothing is deleted early.

The stamp is trusted only when it is ours (owner = euid, not writable by group or others, not a symlink)
and parses; otherwise the prune runs and rewrites it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Protocol

from ..owned_files import read_own

INTERVAL = 3600.0


class Prunable(Protocol):
    def prune(self, before: float) -> int: ...


def stamp_path(data_dir: Path, database: str) -> Path:
    """One stamp per database (a data directory may be used with several database URLs)."""
    return data_dir / f".audit-pruned-{hashlib.sha256(database.encode()).hexdigest()[:16]}"


def last_cutoff(path: Path) -> float | None:
    text = read_own(path, forbid=0o022, limit=64)
    if text is None:
        return None
    try:
        value = float(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None  # not NaN or infinite


def prune_if_due(audit: Prunable, data_dir: Path, database: str, retention: float,
                 now: float | None = None) -> int | None:
    """Prune events older than ``retention`` unless a prune less than INTERVAL ago already did (by
    its cut-off); returns how many were removed, or None when skipped."""
    before = (time.time() if now is None else now) - retention
    path = stamp_path(data_dir, database)
    last = last_cutoff(path)
    if last is not None and last <= before < last + INTERVAL:
        return None
    removed = audit.prune(before)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(repr(before))
        os.rename(tmp, path)
    except OSError:  # an unwritable data directory: the next start prunes again, nothing is lost
        with contextlib.suppress(OSError):
            tmp.unlink()
    return removed
