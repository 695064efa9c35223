"""Creating sandboxes, their time to live (deadline, max_lifetime, idle timeout), and their end.

A template sandbox is handed out only once its template's start command runs (in the background) and its
ready command has succeeded; one that never gets ready is killed, with the reason.

Every sandbox has a deadline (its time to live) and a hard cap (``lifetime.max_lifetime`` from creation); the
reaper kills it at whichever comes first. Ended sandboxes leave a short tombstone so a late caller learns why
the id is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..artifacts import ArtifactWriter
from ..errors import PolicyError, SandboxUnavailableError, StockadeError
from ..policy import Policy, format_duration
from ..runtime.base import Runtime, RuntimeSandbox, SandboxSpec
from ..runtime.channel import StreamPending
from ..sdk.models import SandboxInfo
from .artifact_intake import ArtifactIntake
from .commands import Commands
from .egress import Egress, EgressPlan
from .owners import Owners
from .sandboxes import TOMBSTONES, ManagedSandbox, Reservation, check_envs, new_sandbox_id

READY_TIMEOUT = 60.0        # seconds a template's ready command has to succeed after its start command starts
READY_CHECK_TIMEOUT = 10.0  # one run of the ready command
READY_POLL = 0.2


class Lifecycle(Owners, Egress, ArtifactIntake, Commands):
    """Creating sandboxes, their time to live, their end."""

    async def runtime_named(self, name: str | None) -> Runtime:
        if name is None:
            return self.runtime
        found = self.runtimes.get(name)
        if found is None and self.make_runtime is not None:
            async with self._making:  # made once; a host that cannot run it says why (SandboxUnavailableError)
                found = self.runtimes.get(name)
                if found is None:
                    found = await asyncio.to_thread(self.make_runtime, name)
                    await found.sweep_stale()
                    self.runtimes[name] = found
        if found is None:
            raise PolicyError("runtime", f"runtime {name!r} is not available here; available: "
                              f"{', '.join(sorted(self.runtimes))}")
        return found

    async def create(self, policy: Policy, timeout: float | None = None, envs: Mapping[str, str] | None = None,
                     metadata: Mapping[str, str] | None = None, *, tenant: str | None = None,
                     user_id: str | None = None, runtime: str | None = None, template: str | None = None,
                     reservation: Reservation | None = None, build_step: bool = False) -> ManagedSandbox:
        """``build_step`` (in-process only: templates/build.py) starts a build step's sandbox (SandboxSpec).
        The steps: hold the owner's reservation (the caller's, made against a quota by ``reserve``, or one
        made here), check the request, pick the runtime, set up the egress (broker, secrets' placeholders,
        trust bundle), start the sandbox (or take a warm one), attach its network, register it in the
        reservation's place, run its template's start and ready commands, hand it out."""
        if reservation is None:
            reservation = self.reserve(tenant, user_id, policy)
        try:
            runtime_ = await self.runtime_named(runtime)
            caller_envs = check_envs(envs)
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            ttl = _time_to_live(policy, timeout)
            sandbox_id = new_sandbox_id()
            egress = self._egress_for(sandbox_id, policy, runtime_.layout, caller_envs, tenant, user_id)
            rt, warm = await self._start(runtime_, sandbox_id, policy, egress, template, build_step)
            sb = self._register(rt, policy, ttl, meta, egress, tenant, user_id, reservation,
                                {"env_names": sorted(caller_envs), "warm": warm, "template": template})
        finally:  # a create that failed frees its share; one that registered has moved it to its sandbox
            self.reservations.pop(reservation.id, None)
        if rt.channel.closed:  # died between its ready and here
            await self._on_channel_closed(sb, None)
        config = rt.template_config
        if config is not None and config.start_command:
            try:
                await self._start_template_command(sb, config.start_command, config.ready_command)
            except BaseException:
                await self.kill(sb.id)
                raise
        sb.ready = True
        return sb

    async def _start_template_command(self, sb: ManagedSandbox, start: list[str], ready: list[str] | None) -> None:
        """The template's start command in the background (a dev server, say), then its ready command until it
        exits 0, each READY_POLL s apart, for at most READY_TIMEOUT s. Both are recorded like any command."""
        where = f"the template's start command {' '.join(start)!r}"
        advice = "fix: check the template's --start-cmd (`stockade template show NAME`)"
        try:
            started = await self.start_command(sb.id, start, envs=None, cwd=None, stdin=None, stdin_open=False,
                                               timeout=None, background=True, on_output=None)
        except StockadeError as exc:
            raise SandboxUnavailableError(f"{where} could not start: {exc}", advice) from None
        if started.pid == 0:  # the agent could not exec it (not found, not executable): it says why on stderr
            result = await self.result_of(sb.id, started)
            raise SandboxUnavailableError(f"{where} could not start: {result.stderr.strip()[-300:]}", advice)
        if not ready:
            return
        deadline = self.loop.time() + READY_TIMEOUT
        while True:
            check = min(READY_CHECK_TIMEOUT, max(deadline - self.loop.time(), 0.1))
            record = await self.start_command(sb.id, ready, envs=None, cwd=None, stdin=None, stdin_open=False,
                                              timeout=check, background=False, on_output=None)
            result = await self.result_of(sb.id, record)
            if result.exit_code == 0:
                return
            if self.loop.time() >= deadline:
                said = (result.stderr or result.stdout).strip()[-300:]
                raise SandboxUnavailableError(
                    f"the template's ready command {' '.join(ready)!r} did not succeed within {READY_TIMEOUT:g} s "
                    f"after {where} (last exit code {result.exit_code}{': ' + said if said else ''})",
                    "fix: check the template's --start-cmd and --ready-cmd (`stockade template show NAME`)")
            await asyncio.sleep(READY_POLL)

    async def _start(self, runtime: Runtime, sandbox_id: str, policy: Policy,
                     egress: EgressPlan, template: str | None = None,
                     build_step: bool = False) -> tuple[RuntimeSandbox, bool]:
        """A started sandbox with its network attached (or none of it left on failure); whether it was warm."""
        layout, broker = runtime.layout, egress.broker
        rt: RuntimeSandbox | None = None
        warm = False
        try:
            pool = self.pools.get(template)   # one per template the host pools, and one for its default root
            if (broker is None and runtime is self.runtime and pool is not None and pool.matches(policy)
                    and not build_step):
                rt = await pool.take()
            if rt is not None:  # warm: it gets its id's records, and the caller's variables, now
                warm = True
                if egress.envs:
                    await rt.agent.setenv(egress.envs)
            else:
                rt = await runtime.start(SandboxSpec(sandbox_id, policy, egress.envs, egress.files,
                                                     broker.handle if broker else None, template, build_step))
            if broker is not None:
                await rt.agent.net_bridge(layout.broker, layout.http_proxy_port, layout.socks_port, layout.egress_relay)
            else:  # the same proxy ports answer "network is off" at once, instead of tools timing out
                await rt.agent.net_off(layout.http_proxy_port, layout.socks_port)
        except BaseException:
            if rt is not None:  # started, but its network bridge did not: nothing of it may remain
                await rt.stop()
            if broker is not None:
                await broker.stop()
            raise
        return rt, warm

    def _register(self, rt: RuntimeSandbox, policy: Policy, ttl: float, meta: dict[str, str],
                  egress: EgressPlan, tenant: str | None, user_id: str | None, reservation: Reservation,
                  recorded: dict[str, Any]) -> ManagedSandbox:
        """The sandbox joins the registry in its reservation's place (one synchronous step: its owner's share
        is never counted twice or not at all): recorded, its artifacts stream opened, its timers armed."""
        now = self.loop.time()
        policy = _with_timeout(policy, ttl)  # info().policy shows the lifetime in force, not the default
        sb = ManagedSandbox(rt.id, policy, rt, meta, time.time(), now + ttl, now + policy.lifetime.max_lifetime,
                            broker=egress.broker, tenant=tenant, user_id=user_id, redact=egress.redact,
                            last_active=now, layout=rt.layout)
        self.reservations.pop(reservation.id, None)
        self.sandboxes[sb.id] = sb
        self._record(sb, "sandbox.create", {"policy": policy.to_display(), "timeout": ttl, "metadata": meta,
                                            "runtime": rt.describe(), **recorded})
        rt.channel.on_close = lambda reason: self._on_channel_closed(sb, reason)
        rt.agent.artifacts(StreamPending(lambda h, b: self._artifact_frame(sb, h, b), ("artifact",)))
        self._arm(sb)
        return sb

    def info_of(self, sb: ManagedSandbox) -> SandboxInfo:
        """What ``Sandbox.info()`` answers, for every front end."""
        left = min(sb.deadline, sb.hard_deadline) - self.loop.time()
        return SandboxInfo(sb.id, datetime.fromtimestamp(sb.started_at), datetime.fromtimestamp(time.time() + left),
                           dict(sb.metadata), sb.policy.to_display(), sb.runtime.describe(),
                           "running" if sb.runtime.is_alive() else "ended", sb.user_id)

    def list(self) -> list[ManagedSandbox]:
        return list(self.sandboxes.values())

    def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        sb = self.get(sandbox_id)
        if seconds <= 0:
            raise PolicyError("timeout", "must be a positive number of seconds")
        deadline = self.loop.time() + seconds
        if deadline > sb.hard_deadline + 1e-6:
            left = max(0.0, sb.hard_deadline - self.loop.time())
            raise PolicyError("timeout", f"{format_duration(seconds)} would outlive lifetime.max_lifetime "
                              f"({format_duration(sb.policy.lifetime.max_lifetime)}; {left:.0f}s left)")
        sb.deadline = deadline
        sb.policy = _with_timeout(sb.policy, seconds)
        self._record(sb, "sandbox.timeout", {"timeout": seconds})
        self._arm(sb)

    def _idle_deadline(self, sb: ManagedSandbox) -> float:
        idle = sb.policy.lifetime.idle_timeout
        return float("inf") if idle is None else sb.last_active + idle

    def _arm(self, sb: ManagedSandbox) -> None:
        if sb.timer is not None:
            sb.timer.cancel()
        sb.timer = self.loop.call_at(min(sb.deadline, sb.hard_deadline, self._idle_deadline(sb)), self._expire, sb)

    def _expire(self, sb: ManagedSandbox) -> None:
        now = self.loop.time()
        if sb.hard_deadline <= now:
            reason = "reached lifetime.max_lifetime"
        elif sb.deadline <= now:
            reason = "its timeout expired"
        elif self._idle_deadline(sb) <= now and not sb.busy:
            reason = "it was idle for lifetime.idle_timeout"
        else:  # it was used since the timer was set: look again later
            if sb.busy:
                sb.last_active = now
            self._arm(sb)
            return
        self.loop.create_task(self._end(sb, reason))

    async def kill(self, sandbox_id: str) -> bool:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            return False
        await self._end(sb, "killed")
        return True

    async def _end(self, sb: ManagedSandbox, reason: str) -> None:
        if self.sandboxes.pop(sb.id, None) is None:
            return
        self.tombstones[sb.id] = reason
        while len(self.tombstones) > TOMBSTONES:
            self.tombstones.popitem(last=False)
        if sb.timer is not None:
            sb.timer.cancel()
        self._record(sb, "sandbox.end", {"reason": reason})
        if self.on_end is not None:
            self.on_end(sb, reason)
        for upload in sb.uploads.values():  # half-received artifacts leave no trace
            if isinstance(upload, ArtifactWriter):
                upload.abort()
        sb.uploads.clear()
        for server in sb.forwards.values():  # no new connections; those open end with the channel
            server.close()
        sb.forwards.clear()
        try:
            await sb.runtime.stop()
        finally:
            if sb.broker is not None:
                await sb.broker.stop()

    async def _on_channel_closed(self, sb: ManagedSandbox, reason: BaseException | None) -> None:
        if sb.id not in self.sandboxes:
            return
        peak = sb.runtime.memory_peak()
        if peak is not None and peak >= sb.policy.limits.memory * 0.95:
            why = "the sandbox ran out of memory (limits.memory) and its agent was killed"
        else:
            why = f"the sandbox stopped unexpectedly ({reason})" if reason else "the sandbox stopped unexpectedly"
        await self._end(sb, why)

    async def shutdown(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        await asyncio.gather(*(self._end(sb, "its owner shut down") for sb in list(self.sandboxes.values())),
                             return_exceptions=True)


def _time_to_live(policy: Policy, timeout: float | None) -> float:
    ttl = policy.lifetime.timeout if timeout is None else float(timeout)
    if ttl <= 0:
        raise PolicyError("timeout", "must be a positive number of seconds")
    if ttl > policy.lifetime.max_lifetime:
        raise PolicyError("timeout", f"{format_duration(ttl)} exceeds lifetime.max_lifetime "
                          f"({format_duration(policy.lifetime.max_lifetime)})")
    return ttl


def _with_timeout(policy: Policy, seconds: float) -> Policy:
    """The policy with lifetime.timeout set to the sandbox's effective time to live."""
    return policy.model_copy(update={"lifetime": policy.lifetime.model_copy(update={"timeout": float(seconds)})})
