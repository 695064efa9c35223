"""What one running server holds (settings, database, keys, the core), and the checks every front
end's create and lookup go through (the native routes and server/e2b/ alike)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time
from collections.abc import Callable

from ..audit import SQLAudit
from ..config import HostConfig
from ..core.build import build_manager
from ..core.manager import Manager
from ..core.sandboxes import ManagedSandbox, new_sandbox_id
from ..db import engine_for
from ..errors import ConflictError, PolicyError, QuotaError, SandboxNotFoundError
from ..policy import Policy
from ..pool import WarmPool
from ..runtime.base import Runtime
from ..templates.store import Template, TemplateStore
from .auth import KeyStore, Principal, RateLimiter
from .metrics import MeteredAudit, Metrics
from .rows import SandboxRows
from .settings import ServerSettings


class Server:
    """What one running server holds: settings, database, keys, the manager (whose registry says which
    sandboxes are live, whose they are and what they hold of a quota) and the rows that outlive them."""

    def __init__(self, settings: ServerSettings, config: HostConfig, runtime: Runtime | None = None) -> None:
        self.settings, self.config = settings, config
        self.run_id = secrets.token_hex(8)
        self.engine = engine_for(settings.database_url, config.data_dir)
        self.keys = KeyStore(self.engine)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.rows = SandboxRows(self.engine, self.run_id)
        self._runtime = runtime
        self.manager: Manager | None = None
        self.audit = MeteredAudit(SQLAudit(self.engine), self.metrics)
        self.metrics.watch(self.audit)
        self._pruner: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()   # database writes in flight
        self._row_writes: dict[str, asyncio.Task[None]] = {}   # the last write of each sandbox's row

    @functools.cached_property
    def templates(self) -> TemplateStore:
        """The runtimes' own store (runtime/jail, gvisor: ``<data dir>/templates``), opened once."""
        return TemplateStore(self.config.data_dir / "templates")

    async def start(self) -> None:
        # the runtimes first remove what an earlier run that was killed left on the host
        config = self.config
        if self.settings.runtime:
            config = dataclasses.replace(config, runtime=self.settings.runtime)
        manager = await build_manager(config, runtime=self._runtime, audit=self.audit,
                                      runtimes=self.settings.runtimes, output_recorded=self.settings.audit_output)
        await asyncio.to_thread(self.rows.recover, self.audit)
        manager.on_end = self._ended
        self.metrics.alive.set_function(lambda: len(manager.sandboxes))
        pooled: dict[str | None, int] = {None: self.settings.warm_pool}
        pooled.update(self.settings.warm_pools)
        if any(pooled.values()):
            policy = Policy.from_dict(self.settings.warm_pool_policy)
            store = self.templates
            for template, size in pooled.items():
                if template is not None and size and not store.exists(template):
                    await manager.shutdown()
                    raise PolicyError(f"warm_pools.{template}", f"no template {template!r} in {store.root} "
                                      "(import it first: `stockade template import`)")
            for template, size in pooled.items():
                if size:
                    manager.pools[template] = WarmPool(manager.runtime, policy, size, new_sandbox_id,
                                                       template=template)
                    manager.pools[template].start()
        self.manager = manager
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    def _ended(self, sb: ManagedSandbox, reason: str) -> None:
        """Its quota is already free (it left the core's registry); its row is closed off the loop."""
        self.write_row(sb.id, lambda: self.rows.ended(sb.id, reason))

    def write_row(self, sandbox_id: str, write: Callable[[], None]) -> asyncio.Task[None]:
        """Run a database write of one sandbox's row in a thread, after the earlier ones of the same row: a
        sandbox that ends while its row is being inserted has its end recorded after the insert, not lost."""
        before = self._row_writes.get(sandbox_id)

        async def run() -> None:
            if before is not None:
                await asyncio.wait([before])
            await asyncio.to_thread(write)

        task = asyncio.get_running_loop().create_task(run())
        self._row_writes[sandbox_id] = task
        self._pending.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._pending.discard(t)
            if self._row_writes.get(sandbox_id) is t:
                del self._row_writes[sandbox_id]

        task.add_done_callback(done)
        return task

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
    if srv.m.owned(who.tenant, sandbox_id) is None:
        row = srv.rows.row_of(who.tenant, sandbox_id)  # raises not-found for strangers
        raise SandboxNotFoundError(f"sandbox {sandbox_id!r} has ended: {row.get('end_reason') or 'ended'}")
    return srv.m.get(sandbox_id)


async def check_owner(srv: Server, who: Principal, sandbox_id: str) -> None:
    """Whether the caller's sandbox, live or ended, is this one (artifacts outlive it); another tenant's is not
    found, exactly as one that never existed."""
    if srv.m.owned(who.tenant, sandbox_id) is None:
        await asyncio.to_thread(srv.rows.row_of, who.tenant, sandbox_id)


def visible_to(t: Template, tenant: str) -> bool:
    """A shared template (no owner) or the tenant's own snapshot."""
    return not t.owner or t.owner == tenant


def tenant_template(srv: Server, tenant: str, name: str) -> Template | None:
    """Template ``name`` as ``tenant`` sees it. Another tenant's snapshot, and the host's build cache
    (templates/build.py), are to it templates that do not exist: None, as for a name the store lacks."""
    from ..templates import TemplateError
    from ..templates.store import is_build_cache

    if is_build_cache(name):
        return None
    try:
        t = srv.templates.get(name)
    except TemplateError:   # none of that name, or not a name
        return None
    return t if visible_to(t, tenant) else None


def _check_template(srv: Server, who: Principal, name: str) -> None:
    """A template the tenant may not see is refused as one that does not exist; an unknown or invalid
    name is left to the runtime, which refuses it naming it."""
    from ..templates import TemplateError
    from ..templates.store import is_build_cache

    if tenant_template(srv, who.tenant, name) is not None:
        return
    try:
        hidden = is_build_cache(name) or srv.templates.exists(name)
    except TemplateError:
        hidden = False
    if hidden:
        raise PolicyError("template", f"no template named {name!r} on this host (see `stockade template list`)")


async def create_sandbox(srv: Server, who: Principal, policy: Policy, timeout: float | None,
                         envs: dict[str, str] | None, metadata: dict[str, str] | None,
                         user_id: str | None, runtime: str | None = None,
                         template: str | None = None) -> tuple[ManagedSandbox, bool]:
    """Create a sandbox for the caller through the tenant's gate, quota and one-per-user rule. Returns the
    sandbox and whether it is the user's existing one (one_sandbox_per_user = "reuse")."""
    limits = srv.settings.tenant(who.tenant)
    limits.check(policy)
    limits.check_runtime(runtime or srv.m.runtime.name)
    if template is not None:
        await asyncio.to_thread(_check_template, srv, who, template)
    # From the user's lookup to the reservation nothing awaits: no other create of the tenant comes between.
    existing = srv.m.users_sandbox(who.tenant, user_id)
    if existing is not None and limits.one_sandbox_per_user != "off":
        if limits.one_sandbox_per_user == "reject" or not isinstance(existing, ManagedSandbox) or not existing.ready:
            raise ConflictError(f"user {user_id!r} already has sandbox {existing.id} and this "
                                "tenant allows one sandbox per user")
        return srv.m.get(existing.id), True
    try:
        reservation = srv.m.reserve(who.tenant, user_id, policy, limits)
    except QuotaError:
        srv.metrics.create_failures.labels("quota").inc()
        raise
    try:
        sb = await srv.m.create(policy, timeout, envs, metadata, tenant=who.tenant, user_id=user_id,
                                runtime=runtime, template=template, reservation=reservation)
    except BaseException as exc:
        srv.metrics.create_failures.labels(type(exc).__name__[:40]).inc()
        raise
    if sb.id not in srv.m.sandboxes:  # it died while being created: the caller is told why
        srv.m.get(sb.id)
    await asyncio.shield(srv.write_row(sb.id, lambda: srv.rows.started(sb)))
    srv.metrics.creates.inc()
    return sb, False
