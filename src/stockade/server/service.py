"""What one running server holds (settings, database, keys, the core), and the checks every front
end's create and lookup go through (the native routes and server/e2b/ alike)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time

from ..audit import SQLAudit
from ..config import HostConfig
from ..core.build import build_manager
from ..core.manager import Manager
from ..core.sandboxes import ManagedSandbox, new_sandbox_id
from ..db import engine_for
from ..errors import ConflictError, QuotaError, SandboxNotFoundError
from ..policy import Policy
from ..pool import WarmPool
from ..runtime.base import Runtime
from .auth import KeyStore, Principal, RateLimiter
from .metrics import MeteredAudit, Metrics
from .registry import Registry
from .settings import ServerSettings


class Server:
    """What one running server holds: settings, database, keys, the manager and its sandboxes."""

    def __init__(self, settings: ServerSettings, config: HostConfig, runtime: Runtime | None = None) -> None:
        self.settings, self.config = settings, config
        self.run_id = secrets.token_hex(8)
        self.engine = engine_for(settings.database_url, config.data_dir)
        self.keys = KeyStore(self.engine)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.registry = Registry(self.engine, self.run_id)
        self._runtime = runtime
        self.manager: Manager | None = None
        self.audit = MeteredAudit(SQLAudit(self.engine), self.metrics)
        self.metrics.watch(self.audit)
        self._pruner: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()   # database writes in flight

    async def start(self) -> None:
        # the runtimes first remove what an earlier run that was killed left on the host
        config = self.config
        if self.settings.runtime:
            config = dataclasses.replace(config, runtime=self.settings.runtime)
        manager = await build_manager(config, runtime=self._runtime, audit=self.audit,
                                      runtimes=self.settings.runtimes, output_recorded=self.settings.audit_output)
        await asyncio.to_thread(self.registry.recover, self.audit)
        manager.on_end = self._ended
        if self.settings.warm_pool:
            manager.pool = WarmPool(manager.runtime, Policy.from_dict(self.settings.warm_pool_policy),
                                    self.settings.warm_pool, new_sandbox_id)
            manager.pool.start()
        self.manager = manager
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    def _ended(self, sb: ManagedSandbox, reason: str) -> None:
        self.registry.release(sb.id)  # its quota is free at once; the row is closed off the loop
        self.metrics.alive.set(len(self.registry.live))
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.registry.ended, sb.id, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _prune_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.audit.prune, time.time() - self.settings.audit_retention)
            cap, store = self.settings.audit_max_size, self.audit.inner
            if cap is not None and isinstance(store, SQLAudit):
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(store.prune_to_size, cap)
            await asyncio.sleep(self.settings.reaper_interval or 3600)

    async def stop(self) -> None:
        """Graceful: every sandbox is killed (they never outlive the server) and the audit log flushed."""
        if self._pruner is not None:
            self._pruner.cancel()
        if self.manager is not None:
            await self.manager.shutdown()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.to_thread(self.audit.close)
        self.engine.dispose()

    @property
    def m(self) -> Manager:
        assert self.manager is not None, "the server has not started"
        return self.manager



def live_sandbox(srv: Server, who: Principal, sandbox_id: str) -> ManagedSandbox:
    """The caller's live sandbox; another tenant's is answered exactly like one that never existed."""
    owned = srv.registry.live.get(sandbox_id)
    if owned is None or owned.tenant != who.tenant or not owned.ready:
        row = srv.registry.owner_of(who.tenant, sandbox_id)  # raises not-found for strangers
        raise SandboxNotFoundError(f"sandbox {sandbox_id!r} has ended: {row.get('end_reason') or 'ended'}")
    return srv.m.get(sandbox_id)


async def create_sandbox(srv: Server, who: Principal, policy: Policy, timeout: float | None,
                         envs: dict[str, str] | None, metadata: dict[str, str] | None,
                         user_id: str | None, runtime: str | None = None,
                         template: str | None = None) -> tuple[ManagedSandbox, bool]:
    """Create a sandbox for the caller through the tenant's gate, quota and one-per-user rule. Returns the
    sandbox and whether it is the user's existing one (one_sandbox_per_user = "reuse")."""
    limits = srv.settings.tenant(who.tenant)
    limits.check(policy)
    limits.check_runtime(runtime or srv.m.runtime.name)
    async with srv.registry.lock(who.tenant):
        existing = srv.registry.existing_for_user(who.tenant, user_id)
        if existing is not None and limits.one_sandbox_per_user != "off":
            if limits.one_sandbox_per_user == "reject" or not existing.ready:
                raise ConflictError(f"user {user_id!r} already has sandbox {existing.id} and this "
                                    "tenant allows one sandbox per user")
            return srv.m.get(existing.id), True
        try:
            srv.registry.check_quota(who.tenant, limits, policy)
        except QuotaError:
            srv.metrics.create_failures.labels("quota").inc()
            raise
        owned = srv.registry.reserve(who.tenant, user_id, policy)
    try:
        sb = await srv.m.create(policy, timeout, envs, metadata, tenant=who.tenant, user_id=user_id,
                                runtime=runtime, template=template)
    except BaseException as exc:
        srv.registry.release(owned.id)
        srv.metrics.create_failures.labels(type(exc).__name__[:40]).inc()
        raise
    srv.registry.assign(owned, sb.id)
    if sb.id not in srv.m.sandboxes:  # it died while being created: its quota is free, the caller told why
        srv.registry.release(sb.id)
        srv.m.get(sb.id)
    await asyncio.to_thread(srv.registry.started, owned, dict(sb.metadata))
    srv.metrics.creates.inc()
    srv.metrics.alive.set(len(srv.registry.live))
    return sb, False
