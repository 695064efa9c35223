"""Assembling the core: the one place a manager is made, for the SDK's local mode and the server alike."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..artifacts import DirectoryStore
from ..audit import Audit
from ..config import HostConfig
from ..runtime.base import Runtime
from ..runtime.registry import make_runtime
from .manager import Manager
from .sandboxes import OUTPUT_RECORDED

if TYPE_CHECKING:
    from ..audit import SQLAudit


def open_audit(config: HostConfig) -> SQLAudit:
    """The host's audit store (over sqlite3 when it is a current SQLite file: no sqlalchemy import, see
    audit/store.py), with events past their retention pruned (at most once an hour: a one-shot process does
    not pay for a DELETE at every start; audit/retention.py)."""
    from ..audit.retention import prune_if_due
    from ..audit.store import open_store

    audit = open_store(config.database_url, config.data_dir)
    prune_if_due(audit, config.data_dir, config.database_url or "", config.audit_retention)
    return audit


def raise_open_files_limit() -> tuple[int, int]:
    """Lift this process's soft RLIMIT_NOFILE to its hard limit; returns (before, after). Each live sandbox
    holds a few host descriptors (its channel, pidfd, locks, a broker's sockets), and the usual soft limit of
    1024 would stop a server near 200 sandboxes with EMFILE. Sandboxes are unaffected: the agent sets each
    command's limit from limits.open_files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit: Linux's nr_open default, the most a soft limit may be raised to
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # above fs.nr_open: keep what there is
        return soft, soft
    return soft, target


async def build_manager(config: HostConfig, *, runtime: Runtime | None = None, audit: Audit | None = None,
                        runtimes: Sequence[str] | None = None, output_recorded: int = OUTPUT_RECORDED) -> Manager:
    """A manager over ``config.runtime`` (or the ``runtime`` given, e.g. a test's), plus the other named
    ``runtimes`` sandboxes may ask for (None: any registered one, made on first use, as the SDK's local mode
    does). What a process that died without tearing down left on the host is removed first, by each runtime;
    artifacts and audit events past their retention are pruned."""
    raise_open_files_limit()
    default: Runtime = runtime if runtime is not None else await asyncio.to_thread(make_runtime, config.runtime, config)
    others = [await asyncio.to_thread(make_runtime, name, config) for name in runtimes or ()
              if name != default.name]
    for rt in (default, *others):
        await rt.sweep_stale()
    store = DirectoryStore(config.data_dir / "artifacts")
    store.prune()
    if audit is None:
        audit = await asyncio.to_thread(open_audit, config)
    manager = Manager(default, store, audit, output_recorded)
    manager.runtimes.update({rt.name: rt for rt in others})
    manager.host_groups = config.host_groups
    if runtimes is None:
        manager.make_runtime = lambda name: make_runtime(name, config)
    return manager
