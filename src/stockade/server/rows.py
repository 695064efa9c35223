"""The server's rows of its sandboxes: who owned each, also after it ended, and what a restart finds.

Which sandboxes are live, who owns them and what they hold against a quota is the core's registry
(core/owners.py); this is only its durable record. Every sandbox the server hands out has a row in the
``sandboxes`` table (tenant, user, resources, state). Rows outlive the sandbox, so artifacts and audit events
stay reachable by their tenant only. A server that starts finds rows of an earlier run still marked running:
their processes died with that run (bwrap --die-with-parent), the runtime sweeps what they left on the host,
and the rows are closed with the reason.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..audit import Audit, AuditEvent
from ..core.sandboxes import ManagedSandbox
from ..db import sandboxes
from ..errors import SandboxNotFoundError

RESTARTED = "the server restarted: sandboxes do not outlive the server process that ran them"


class SandboxRows:
    """The ``sandboxes`` table. Each method is a blocking database call: run it off the loop."""

    def __init__(self, engine: Engine, run_id: str) -> None:
        self.engine = engine
        self.run_id = run_id

    def recover(self, audit: Audit) -> list[str]:
        """Close the rows of sandboxes an earlier run left marked running."""
        now = time.time()
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(sandboxes.c.id, sandboxes.c.tenant, sandboxes.c.user_id)
                                .where(sandboxes.c.state == "running", sandboxes.c.run_id != self.run_id)).all()
            conn.execute(sandboxes.update().where(sandboxes.c.id.in_([r.id for r in rows]))
                         .values(state="ended", ended=now, end_reason=RESTARTED))
        for r in rows:
            audit.record(AuditEvent("sandbox.end", {"reason": RESTARTED}, r.id, r.tenant, r.user_id))
        return [r.id for r in rows]

    def started(self, sb: ManagedSandbox) -> None:
        limits = sb.policy.limits
        with self.engine.begin() as conn:
            conn.execute(sandboxes.insert().values(
                id=sb.id, tenant=sb.tenant, user_id=sb.user_id, run_id=self.run_id, state="running",
                created=time.time(), memory=limits.memory, cpus=limits.cpus, metadata=dict(sb.metadata)))

    def ended(self, sandbox_id: str, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sandboxes.update().where(sandboxes.c.id == sandbox_id)
                         .values(state="ended", ended=time.time(), end_reason=reason[:512]))

    def ended_rows(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The tenant's ended sandboxes, latest first."""
        q = (sa.select(sandboxes).where(sandboxes.c.tenant == tenant, sandboxes.c.state == "ended")
             .order_by(sandboxes.c.ended.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def row_of(self, tenant: str, sandbox_id: str) -> dict[str, Any]:
        """The row of a sandbox of this tenant; another tenant's is not found, exactly as one that never
        existed."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sandboxes).where(sandboxes.c.id == sandbox_id,
                                                          sandboxes.c.tenant == tenant)).first()
        if row is None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist")
        return dict(row._mapping)
