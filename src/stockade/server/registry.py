"""Who owns which sandbox, tenant quotas, and what a restart finds.

Every sandbox the server creates has a row in the ``sandboxes`` table (tenant, user, resources, state).
Rows outlive the sandbox, so artifacts and audit events stay reachable by their tenant only. A server that
starts finds rows of an earlier run still marked running: their processes died with that run (bwrap
--die-with-parent), the runtime sweeps what they left on the host, and the rows are closed with the reason.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..audit import Audit, AuditEvent
from ..db import sandboxes
from ..errors import PolicyError, QuotaError, SandboxNotFoundError
from ..policy import Policy, format_duration, format_size
from .settings import TenantSettings

RESTARTED = "the server restarted: sandboxes do not outlive the server process that ran them"


@dataclass
class Owned:
    id: str
    tenant: str
    user_id: str | None
    memory: int
    cpus: float
    ready: bool = False     # False while it is being created (it counts against the quota already)


class Registry:
    def __init__(self, engine: Engine, run_id: str) -> None:
        self.engine = engine
        self.run_id = run_id
        self.live: dict[str, Owned] = {}
        self._locks: dict[str, asyncio.Lock] = {}

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

    def lock(self, tenant: str) -> asyncio.Lock:
        """Held while a tenant's create checks its quota and reserves, so concurrent creates cannot overshoot."""
        return self._locks.setdefault(tenant, asyncio.Lock())

    def existing_for_user(self, tenant: str, user_id: str | None) -> Owned | None:
        if user_id is None:
            return None
        return next((o for o in self.live.values() if o.tenant == tenant and o.user_id == user_id), None)

    def check_quota(self, tenant: str, limits: TenantSettings, policy: Policy) -> None:
        mine = [o for o in self.live.values() if o.tenant == tenant]
        if len(mine) + 1 > limits.max_sandboxes:
            raise QuotaError(f"tenant {tenant!r} has {len(mine)} running sandboxes, its limit "
                             f"(max_sandboxes = {limits.max_sandboxes}); kill one or wait for one to end")
        memory = sum(o.memory for o in mine) + policy.limits.memory
        if memory > limits.max_memory:
            raise QuotaError(f"this sandbox's limits.memory ({format_size(policy.limits.memory)}) would bring "
                             f"tenant {tenant!r} over its max_memory ({format_size(limits.max_memory)})")
        cpus = sum(o.cpus for o in mine) + policy.limits.cpus
        if cpus > limits.max_cpus + 1e-9:
            raise QuotaError(f"this sandbox's limits.cpus ({policy.limits.cpus:g}) would bring tenant {tenant!r} "
                             f"over its max_cpus ({limits.max_cpus:g})")
        if policy.lifetime.max_lifetime > limits.max_lifetime:
            raise PolicyError("lifetime.max_lifetime", f"{format_duration(policy.lifetime.max_lifetime)} exceeds "
                              f"this tenant's cap ({format_duration(limits.max_lifetime)})")

    def reserve(self, tenant: str, user_id: str | None, policy: Policy) -> Owned:
        """Count a sandbox being created against the quota (under a provisional key until it has its id)."""
        owned = Owned("creating-" + secrets.token_hex(8), tenant, user_id, policy.limits.memory, policy.limits.cpus)
        self.live[owned.id] = owned
        return owned

    def assign(self, owned: Owned, sandbox_id: str) -> None:
        del self.live[owned.id]
        owned.id = sandbox_id
        self.live[sandbox_id] = owned

    def release(self, sandbox_id: str) -> None:
        self.live.pop(sandbox_id, None)

    def started(self, owned: Owned, metadata: dict[str, str]) -> None:
        owned.ready = True
        with self.engine.begin() as conn:
            conn.execute(sandboxes.insert().values(
                id=owned.id, tenant=owned.tenant, user_id=owned.user_id, run_id=self.run_id, state="running",
                created=time.time(), memory=owned.memory, cpus=owned.cpus, metadata=metadata))

    def ended(self, sandbox_id: str, reason: str) -> None:
        """Record the end in the database (the live entry is already gone: see release)."""
        with self.engine.begin() as conn:
            conn.execute(sandboxes.update().where(sandboxes.c.id == sandbox_id)
                         .values(state="ended", ended=time.time(), end_reason=reason[:512]))

    def ended_rows(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The tenant's ended sandboxes, latest first."""
        q = (sa.select(sandboxes).where(sandboxes.c.tenant == tenant, sandboxes.c.state == "ended")
             .order_by(sandboxes.c.ended.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def owner_of(self, tenant: str, sandbox_id: str) -> dict[str, Any]:
        """The row of a sandbox (live or ended) of this tenant; another tenant's is not found, exactly as
        one that never existed."""
        live = self.live.get(sandbox_id)
        if live is not None and live.tenant == tenant and live.ready:
            return {"id": sandbox_id, "tenant": tenant, "state": "running", "user_id": live.user_id}
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sandboxes).where(sandboxes.c.id == sandbox_id,
                                                          sandboxes.c.tenant == tenant)).first()
        if row is None:
            raise SandboxNotFoundError(f"sandbox {sandbox_id!r} does not exist")
        return dict(row._mapping)
