"""The core's shared state and the helpers every part uses."""

from __future__ import annotations

import asyncio
import builtins
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..artifacts import ArtifactStore
from ..audit import Audit, AuditEvent, NullAudit
from ..broker.resolver import Resolver, system_resolver
from ..errors import SandboxNotFoundError
from ..pool import WarmPool
from ..runtime.base import Runtime
from ..runtime.channel import CommandPending
from .sandboxes import OUTPUT_RECORDED, ManagedSandbox, Reservation


class CoreBase:
    """The state every part of the core shares: the registry of live sandboxes (and of creates in flight,
    owners.py), the runtimes, the audit log and the artifact store. The parts (lifecycle, commands, files,
    ...) are mixins over it."""

    def __init__(self, runtime: Runtime, artifacts: ArtifactStore, audit: Audit | None = None,
                 output_recorded: int = OUTPUT_RECORDED) -> None:
        self.runtime = runtime              # the default one
        self.runtimes: dict[str, Runtime] = {runtime.name: runtime}   # those sandboxes may ask for by name
        # makes a registered runtime on first use (the SDK's local mode); None: only those in self.runtimes
        self.make_runtime: Callable[[str], Runtime] | None = None
        self._making = asyncio.Lock()
        self.artifacts = artifacts
        self.audit: Audit = audit or NullAudit()
        self.output_recorded = output_recorded
        self.resolver: Resolver = system_resolver
        self.host_groups: dict[str, builtins.list[str]] = {}  # "@name" rule lists from the host's config
        self.sandboxes: dict[str, ManagedSandbox] = {}
        self.reservations: dict[str, Reservation] = {}   # creates in flight, by a provisional id (owners.py)
        self.tombstones: OrderedDict[str, str] = OrderedDict()
        self.on_end: Callable[[ManagedSandbox, str], None] | None = None   # told when any sandbox ends
        self.pools: dict[str | None, WarmPool] = {}   # by template (None: the runtime's default root)
        self.loop = asyncio.get_running_loop()

    def get(self, sandbox_id: str) -> ManagedSandbox:
        """The live sandbox; every request goes through here, so this is also what keeps it from idling."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            why = self.tombstones.get(sandbox_id)
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} " + (f"has ended: {why}" if why else
                                       "does not exist (or belongs to another process)"))
        sb.last_active = self.loop.time()
        return sb

    def _record(self, sb: ManagedSandbox, kind: str, data: dict[str, Any]) -> None:
        self.audit.record(AuditEvent(kind, sb.redact(data), sb.id, sb.tenant, sb.user_id))

    def _recorded_output(self, sb: ManagedSandbox, pending: CommandPending) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stream, buf in pending.output.items():
            out[stream] = bytes(buf[:self.output_recorded]).decode("utf-8", "replace")
            out[f"{stream}_bytes"] = len(buf)
        out["output_truncated"] = any(len(b) > self.output_recorded for b in pending.output.values()) or \
            any(pending.truncated.values())
        return out

