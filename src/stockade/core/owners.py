"""Who owns which live sandbox, and the creates in flight: the core's one registry, and an owner's quota.

``sandboxes`` holds the sandboxes that exist; ``reservations`` the creates that have not made theirs yet, so a
quota counts a sandbox from before it exists. A create's reservation becomes its sandbox in the step that
registers it (lifecycle.py), or is dropped when the create fails; a sandbox frees its share when it leaves
``sandboxes``, however it ends. So each is counted once, and freed once, by construction.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import PolicyError, QuotaError
from ..policy import Policy, format_duration, format_size
from .base import CoreBase
from .sandboxes import ManagedSandbox, Reservation


class Quota(Protocol):
    """What an owner (a server's tenant) may hold at once (the server's TenantSettings)."""

    @property
    def max_sandboxes(self) -> int: ...
    @property
    def max_memory(self) -> int: ...
    @property
    def max_cpus(self) -> float: ...
    @property
    def max_lifetime(self) -> float: ...


class Owners(CoreBase):
    """The registry by owner: what a tenant holds, a user's sandbox, reservations and quotas."""

    def owned(self, tenant: str | None, sandbox_id: str) -> ManagedSandbox | None:
        """The tenant's live sandbox, once its create has returned it; anyone else's (or one still being
        created) is None, exactly as one that does not exist."""
        sb = self.sandboxes.get(sandbox_id)
        return sb if sb is not None and sb.tenant == tenant and sb.ready else None

    def owned_by(self, tenant: str | None) -> list[ManagedSandbox]:
        """The tenant's live sandboxes that have been handed out."""
        return [sb for sb in list(self.sandboxes.values()) if sb.tenant == tenant and sb.ready]

    def users_sandbox(self, tenant: str | None, user_id: str | None) -> ManagedSandbox | Reservation | None:
        """The user's live sandbox, or their create in flight (a Reservation), if they have one."""
        if user_id is None:
            return None
        held: list[ManagedSandbox | Reservation] = [*self.sandboxes.values(), *self.reservations.values()]
        return next((h for h in held if h.tenant == tenant and h.user_id == user_id), None)

    def reserve(self, tenant: str | None, user_id: str | None, policy: Policy,
                quota: Quota | None = None) -> Reservation:
        """Count a create against its owner's ``quota`` (None: no quota), or raise QuotaError (PolicyError for
        a lifetime over the cap). The check and the reservation are one synchronous step on the core's loop,
        so concurrent creates cannot both take the last share."""
        if quota is not None:
            self._check_quota(tenant, policy, quota)
        reservation = Reservation(tenant, user_id, policy.limits.memory, policy.limits.cpus)
        self.reservations[reservation.id] = reservation
        return reservation

    def _check_quota(self, tenant: str | None, policy: Policy, quota: Quota) -> None:
        mine = [(sb.policy.limits.memory, sb.policy.limits.cpus) for sb in self.sandboxes.values()
                if sb.tenant == tenant]
        mine += [(r.memory, r.cpus) for r in self.reservations.values() if r.tenant == tenant]
        if len(mine) + 1 > quota.max_sandboxes:
            raise QuotaError(f"tenant {tenant!r} has {len(mine)} running sandboxes, its limit "
                             f"(max_sandboxes = {quota.max_sandboxes}); kill one or wait for one to end")
        memory = sum(m for m, _ in mine) + policy.limits.memory
        if memory > quota.max_memory:
            raise QuotaError(f"this sandbox's limits.memory ({format_size(policy.limits.memory)}) would bring "
                             f"tenant {tenant!r} over its max_memory ({format_size(quota.max_memory)})")
        cpus = sum(c for _, c in mine) + policy.limits.cpus
        if cpus > quota.max_cpus + 1e-9:
            raise QuotaError(f"this sandbox's limits.cpus ({policy.limits.cpus:g}) would bring tenant {tenant!r} "
                             f"over its max_cpus ({quota.max_cpus:g})")
        if policy.lifetime.max_lifetime > quota.max_lifetime:
            raise PolicyError("lifetime.max_lifetime", f"{format_duration(policy.lifetime.max_lifetime)} exceeds "
                              f"this tenant's cap ({format_duration(quota.max_lifetime)})")
