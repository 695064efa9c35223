"""The registry of live sandboxes: lifecycle, time to live, and the requests a sandbox serves.

Runs on one asyncio loop. Every sandbox has a deadline (its time to live) and a hard cap
(``lifetime.max_lifetime`` from creation); the reaper kills it at whichever comes first. Ended sandboxes
leave a short tombstone so a late caller learns why the id is gone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .agent import protocol
from .artifacts import ArtifactError, ArtifactStore, ArtifactWriter
from .audit import Audit, AuditEvent, NullAudit, Redactor
from .broker.proxy import Resolver, system_resolver
from .broker.rules import RuleError
from .broker.secrets import SandboxCA, load_secrets, sandbox_trust_bundle
from .broker.server import BrokerEndpoint
from .errors import FilesystemError, PolicyError, ProtocolError, SandboxNotFoundError, SandboxUnavailableError
from .policy import NetworkPolicy, Policy, format_duration, format_size
from .pool import WarmPool
from .runtime.agent_client import FILE_OPS
from .runtime.base import Runtime, RuntimeSandbox, SandboxLayout, SandboxSpec
from .runtime.channel import CellPending, CommandPending, ReadPending, StreamPending

TOMBSTONES = 1024
ENV_NAME_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
Argv = list[str]  # spelled once here: a method named `list` shadows the builtin in class bodies


def new_sandbox_id() -> str:
    return "sbx-" + secrets.token_hex(8)


def check_envs(envs: Mapping[str, str] | None, field_name: str = "envs") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (envs or {}).items():
        if not isinstance(k, str) or not k or k[0].isdigit() or not set(k) <= ENV_NAME_OK:
            raise PolicyError(field_name, f"invalid environment variable name {k!r}")
        if not isinstance(v, str) or "\0" in v:
            raise PolicyError(f"{field_name}.{k}", "value must be a string without NUL bytes")
        out[k] = v
    return out


@dataclass
class CommandRecord:
    pid: int
    rid: int
    cmd: str
    pending: CommandPending
    background: bool
    timeout: float | None = None
    oom_before: int | None = None       # the sandbox's OOM-kill count when the command started


LANGUAGES = ("python", "bash", "javascript")
OUTPUT_RECORDED = 64 << 10   # per stream and command: what the audit log keeps of its output


def proxy_env(layout: SandboxLayout) -> dict[str, str]:
    """What every common client reads (curl, pip, npm, git, requests, httpx, node) to find the proxy."""
    http, socks = f"http://127.0.0.1:{layout.http_proxy_port}", f"socks5h://127.0.0.1:{layout.socks_port}"
    return {name: value for names, value in (
        (("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"), http),
        (("ALL_PROXY", "all_proxy"), socks),
        (("NO_PROXY", "no_proxy"), "localhost,127.0.0.1,::1"),
        # node's fetch reads none of the above before node 24: a preload points it at the proxy
        (("NODE_OPTIONS",), "--require /opt/stockade/agent/node_proxy.js"),
    ) for name in names}


def trust_env(layout: SandboxLayout) -> dict[str, str]:
    """Where clients find the trust bundle that includes the sandbox's CA (for intercepted hosts)."""
    bundle = layout.trust_bundle
    return {"SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle, "PIP_CERT": bundle,
            "GIT_SSL_CAINFO": bundle, "NODE_EXTRA_CA_CERTS": layout.sandbox_ca}


CONTEXT_START_TIMEOUT = 60.0


@dataclass
class CodeContext:
    """A stateful interpreter inside a sandbox. ``alive`` is False after a crash or a kill: the next
    cell starts it afresh under the same id."""

    id: str
    language: str
    cwd: str
    backend: str = ""
    alive: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class ManagedSandbox:
    id: str
    policy: Policy
    runtime: RuntimeSandbox
    metadata: dict[str, str]
    started_at: float                       # wall clock, for display
    deadline: float                         # loop time
    hard_deadline: float                    # loop time: creation + max_lifetime
    timer: asyncio.TimerHandle | None = None
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    uploads: dict[int, ArtifactWriter | ArtifactError] = field(default_factory=dict)  # artifacts arriving
    broker: BrokerEndpoint | None = None
    tenant: str | None = None
    user_id: str | None = None
    redact: Redactor = field(default_factory=Redactor)
    last_active: float = 0.0                # loop time of the last request or foreground work
    busy: int = 0                           # foreground commands and cells running now
    layout: SandboxLayout = field(default_factory=SandboxLayout)   # its runtime's paths and ports inside

    @property
    def channel(self) -> Any:
        return self.runtime.channel


class Manager:
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
        self.tombstones: OrderedDict[str, str] = OrderedDict()
        self.on_end: Callable[[ManagedSandbox, str], None] | None = None   # told when any sandbox ends
        self.pool: WarmPool | None = None
        self.loop = asyncio.get_running_loop()

    # ---- lifecycle -----------------------------------------------------------------------------
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
                     user_id: str | None = None, runtime: str | None = None) -> ManagedSandbox:
        runtime_ = await self.runtime_named(runtime)
        layout = runtime_.layout
        envs = check_envs(envs)
        caller_env_names = sorted(envs)  # recorded: the caller's variables, not the defaults added below
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        ttl = policy.lifetime.timeout if timeout is None else float(timeout)
        if ttl <= 0:
            raise PolicyError("timeout", "must be a positive number of seconds")
        if ttl > policy.lifetime.max_lifetime:
            raise PolicyError("timeout", f"{format_duration(ttl)} exceeds lifetime.max_lifetime "
                              f"({format_duration(policy.lifetime.max_lifetime)})")
        sandbox_id = new_sandbox_id()
        warm = False
        broker = None
        files: dict[str, bytes] = {}
        redact = Redactor()
        if policy.network.mode == "allowlist":
            secrets_, ca = load_secrets(dict(policy.secrets)), None
            redact = Redactor(sec.value for sec in secrets_)

            def on_network(event: dict[str, Any]) -> None:
                self.audit.record(AuditEvent("network.connection", redact(event), sandbox_id, tenant, user_id))
            if secrets_:
                ca = SandboxCA(sandbox_id, datetime.timedelta(seconds=policy.lifetime.max_lifetime + 3600))
                files = {layout.trust_bundle: sandbox_trust_bundle(ca.pem), layout.sandbox_ca: ca.pem}
            try:
                broker = BrokerEndpoint(sandbox_id, policy.network, on_network, self._resolve, secrets_, ca,
                                        self.host_groups)
            except RuleError as exc:
                raise PolicyError("network.allow", str(exc)) from None
            # placeholders win over same-named envs: a secret's real value never enters the sandbox
            envs = {**proxy_env(layout), **(trust_env(layout) if secrets_ else {}), **envs,
                    **{sec.name: sec.placeholder.decode() for sec in secrets_}}
        else:  # the proxy ports refuse with the reason (op net_off); pip retries once, which prints the reason
            envs = {**proxy_env(layout), "PIP_RETRIES": "1", **envs}
        rt: RuntimeSandbox | None = None
        try:
            if broker is None and runtime_ is self.runtime and self.pool is not None and self.pool.matches(policy):
                rt = await self.pool.take()
            if rt is not None:  # warm: it gets its id's records, and the caller's variables, now
                sandbox_id, warm = rt.id, True
                if envs:
                    await rt.agent.setenv(envs)
            else:
                rt = await runtime_.start(SandboxSpec(sandbox_id, policy, envs, files,
                                                      broker.handle if broker else None))
            if broker is not None:
                await rt.agent.net_bridge(layout.broker, layout.http_proxy_port, layout.socks_port)
            else:  # the same proxy ports answer "network is off" at once, instead of tools timing out
                await rt.agent.net_off(layout.http_proxy_port, layout.socks_port)
        except BaseException:
            if rt is not None:  # started, but its network bridge did not: nothing of it may remain
                await rt.stop()
            if broker is not None:
                await broker.stop()
            raise
        now = self.loop.time()
        policy = _with_timeout(policy, ttl)  # info().policy shows the lifetime in force, not the default
        sb = ManagedSandbox(sandbox_id, policy, rt, meta, time.time(), now + ttl,
                            now + policy.lifetime.max_lifetime, broker=broker, tenant=tenant, user_id=user_id,
                            redact=redact, last_active=now, layout=layout)
        self.sandboxes[sandbox_id] = sb
        self._record(sb, "sandbox.create", {"policy": policy.to_display(), "timeout": ttl, "metadata": meta,
                                            "env_names": caller_env_names, "runtime": rt.describe(),
                                            "warm": warm})
        rt.channel.on_close = lambda reason: self._on_channel_closed(sb, reason)
        rt.agent.artifacts(StreamPending(lambda h, b: self._artifact_frame(sb, h, b), ("artifact",)))
        if rt.channel.closed:  # died between its ready and here
            await self._on_channel_closed(sb, None)
        self._arm(sb)
        return sb

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
        if self.pool is not None:
            await self.pool.close()
        await asyncio.gather(*(self._end(sb, "its owner shut down") for sb in list(self.sandboxes.values())),
                             return_exceptions=True)

    # ---- processes -----------------------------------------------------------------------------
    def _command_timeout(self, sb: ManagedSandbox, timeout: float | None, background: bool) -> float | None:
        """limits.command_timeout is the default; a call's own timeout may be longer, up to
        limits.max_command_timeout where the policy sets one, and never past the sandbox's end."""
        lim = sb.policy.limits
        if timeout is None:
            return None if background else lim.command_timeout
        if timeout <= 0:
            if not background:
                raise PolicyError("timeout", "a foreground command needs a positive timeout")
            return None
        if background:
            return float(timeout)
        cap = lim.max_command_timeout
        if cap is not None and timeout > cap:
            raise PolicyError("timeout", f"{format_duration(timeout)} exceeds limits.max_command_timeout "
                              f"({format_duration(cap)}); raise limits.max_command_timeout")
        left = sb.deadline - self.loop.time()
        if timeout > left:
            raise PolicyError("timeout", f"{format_duration(timeout)} outlives the sandbox, which ends in "
                              f"{format_duration(max(round(left), 1))}; extend it first (set_timeout, up to "
                              "lifetime.max_lifetime)")
        return float(timeout)

    async def start_command(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                            cwd: str | None, stdin: bytes | None, stdin_open: bool, timeout: float | None,
                            background: bool, on_output: Callable[[str, bytes], None] | None) -> CommandRecord:
        sb = self.get(sandbox_id)
        env = check_envs(envs)
        limit = self._command_timeout(sb, timeout, background)
        if not isinstance(cmd, str) and (not cmd or not all(isinstance(a, str) for a in cmd)):
            raise PolicyError("cmd", "argv must be a non-empty list of strings")
        pending = CommandPending(sb.policy.limits.output, on_output)
        oom_before = sb.runtime.oom_kills()
        data = stdin or b""
        inline = len(data) <= protocol.CHUNK  # larger stdin follows in chunks
        rid = sb.runtime.agent.exec(pending, cmd, env=env, cwd=cwd, timeout=limit, limit=sb.policy.limits.output,
                                    stdin_open=stdin_open or not inline, stdin=data if inline else b"")
        pid = await pending.started
        record = CommandRecord(pid, rid, cmd if isinstance(cmd, str) else " ".join(cmd), pending, background,
                               limit, oom_before)
        self._record(sb, "command.start", {"pid": pid, ("cmd" if isinstance(cmd, str) else "argv"): cmd,
                                           "cwd": cwd, "env_names": sorted(env), "background": background,
                                           "stdin_bytes": len(data)})
        started = time.monotonic()
        if not background:
            sb.busy += 1

        def ended(fut: asyncio.Future[dict[str, Any]]) -> None:
            if not background:
                sb.busy -= 1
                sb.last_active = self.loop.time()
            exit_ = fut.result() if not fut.cancelled() and fut.exception() is None else {}
            if exit_:
                exit_.update(self._limit_hit(sb, record, exit_))
            self._record(sb, "command.end", {"pid": pid, "exit_code": exit_.get("code"), "signal": exit_.get("signal"),
                                             "limit": exit_.get("limit"), "error": exit_.get("error"),
                                             "timed_out": bool(exit_.get("timed_out")),
                                             "duration": round(time.monotonic() - started, 6),
                                             "ended": "exit" if exit_ else "sandbox ended",
                                             **self._recorded_output(sb, pending)})

        pending.done.add_done_callback(ended)
        if not inline:
            try:
                await self.send_stdin(sandbox_id, pid, data, eof=not stdin_open)
            except FilesystemError as exc:
                if exc.errno_name != "ESRCH":  # it exited without reading all of it: not an error
                    raise
        return record

    def _limit_hit(self, sb: ManagedSandbox, record: CommandRecord, exit_: dict[str, Any]) -> dict[str, str]:
        """Which limit ended or cut the command, from what was observed: the agent's timeout flag, the
        memory cgroup's own OOM-kill counter, the signal, the output cap, the agent's spawn error."""
        lim = sb.policy.limits
        sig, stderr = exit_.get("signal"), bytes(record.pending.output["stderr"][-300:])
        if exit_.get("timed_out"):
            value = record.timeout if record.timeout is not None else lim.command_timeout
            return {"limit": "limits.command_timeout",
                    "error": f"timed out: the command ran past its timeout ({format_duration(value)}) and was "
                             "killed; pass a longer timeout= or raise limits.command_timeout"}
        oom_after = sb.runtime.oom_kills()
        if sig == 9 and _oom_killed_since(record.oom_before, oom_after):
            return {"limit": "limits.memory",
                    "error": f"out of memory: the sandbox's memory limit ({format_size(lim.memory)}) was reached and "
                             "the kernel killed the command; raise limits.memory"}
        if sig == 25:  # SIGXFSZ
            return {"limit": "limits.file_size",
                    "error": f"a file grew past limits.file_size ({format_size(lim.file_size)}); raise it"}
        if exit_.get("code") == 127 and b"stockade: cannot run" in stderr and b"Resource temporarily" in stderr:
            return {"limit": "limits.pids",
                    "error": f"no process could be started: the sandbox's processes hold all {lim.pids} of "
                             "limits.pids; kill some (commands.kill_all()) or raise limits.pids"}
        if any(record.pending.truncated.values()):
            return {"limit": "limits.output",
                    "error": f"output passed limits.output ({format_size(lim.output)} per stream) and was cut; "
                             "write large output to a file, or raise limits.output"}
        if sig == 9 and oom_after is None and sb.runtime.memory_peak() is None:
            return {"error": "killed by SIGKILL; this host has no memory cgroup, so an out-of-memory kill "
                             "(limits.memory) cannot be confirmed or ruled out"}
        return {}

    def _cell_limit_hit(self, sb: ManagedSandbox, done: dict[str, Any], timeout: float | None,
                        oom_before: int | None) -> dict[str, Any] | None:
        lim = sb.policy.limits
        if done.get("timed_out"):
            what = ("ignored the interrupt, so its context was killed and restarts empty on the next call"
                    if done.get("restarted") else "was interrupted (the context keeps its state)")
            return {"type": "error", "name": "TimeoutError", "traceback": "", "limit": "limits.command_timeout",
                    "value": f"the cell ran past its timeout ({format_duration(timeout or lim.command_timeout)}) "
                             f"and {what}; pass a longer timeout= or raise limits.command_timeout"}
        if done.get("restarted") and _oom_killed_since(oom_before, sb.runtime.oom_kills()):
            return {"type": "error", "name": "MemoryError", "traceback": "", "limit": "limits.memory",
                    "value": f"out of memory: the sandbox's memory limit ({format_size(lim.memory)}) was reached and "
                             "the kernel killed the interpreter, which restarts empty on the next call; raise "
                             "limits.memory"}
        return None

    async def wait_command(self, sandbox_id: str, record: CommandRecord) -> dict[str, Any]:
        sb = self.sandboxes.get(sandbox_id)
        grace = 5.0
        limit = None
        if sb is not None and not record.background:
            limit = (record.timeout or sb.policy.limits.command_timeout) + grace
        try:
            result: dict[str, Any] = await asyncio.wait_for(asyncio.shield(record.pending.done), limit)
            return result
        except TimeoutError:
            # The agent missed its own deadline: it is not trusted to, so the host ends the command.
            with contextlib.suppress(Exception):
                await self.signal(sandbox_id, record.pid, 9)
            return {"code": None, "signal": 9, "timed_out": True, "truncated": {}}

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool = False) -> None:
        sb = self.get(sandbox_id)
        view = memoryview(data)
        while True:
            chunk, view = bytes(view[:protocol.CHUNK]), view[protocol.CHUNK:]
            last = not view
            await sb.runtime.agent.stdin(pid, chunk, eof and last)
            if last:
                return

    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool:
        sb = self.get(sandbox_id)
        try:
            await sb.runtime.agent.signal(pid, sig)
            return True
        except FilesystemError as exc:
            if exc.errno_name == "ESRCH":
                return False
            raise

    async def kill_all(self, sandbox_id: str) -> int:
        """SIGKILL every process in the sandbox but its agent (commands, what they left running, code
        contexts); the sandbox stays usable. Returns how many processes were killed."""
        sb = self.get(sandbox_id)
        result = await sb.runtime.agent.kill_all()
        for ctx in sb.contexts.values():  # their interpreters are gone: the next cell starts a fresh one
            ctx.alive = False
        killed = result.get("killed")
        count = killed if isinstance(killed, int) and not isinstance(killed, bool) and killed >= 0 else 0
        self._record(sb, "command.kill_all", {"killed": count})
        return count

    async def list_commands(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        sb = self.get(sandbox_id)
        result = await sb.runtime.agent.ps()
        procs = result.get("procs")
        if not isinstance(procs, list):
            raise SandboxUnavailableError("the sandbox's agent answered ps with garbage")
        return [p for p in procs if isinstance(p, dict) and isinstance(p.get("pid"), int)][:10000]

    # ---- network -------------------------------------------------------------------------------
    async def _resolve(self, host: str, port: int) -> builtins.list[Any]:
        return await self.resolver(host, port)  # an attribute, so a test can map made-up names

    def update_network(self, sandbox_id: str, changes: dict[str, Any]) -> NetworkPolicy:
        """Narrow or widen a live sandbox's egress; new connections see it at once."""
        sb = self.get(sandbox_id)
        policy = sb.policy.with_overrides(network=changes)
        if sb.broker is None:
            if policy.network.mode != "none":
                raise PolicyError("network.mode", "this sandbox was created without a network; create it with "
                                  "network.mode = \"allowlist\" to open hosts later")
        else:
            network = policy.network
            if network.mode == "none":  # no more egress: an empty allow list denies everything
                network = network.model_copy(update={"allow": []})
            try:
                sb.broker.update(network)
            except RuleError as exc:
                raise PolicyError("network.allow", str(exc)) from None
        sb.policy = policy
        self._record(sb, "network.update", {"changes": changes, "network": policy.to_display()["network"]})
        return policy.network

    def network_events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        sb = self.get(sandbox_id)
        return builtins.list(sb.broker.events) if sb.broker is not None else []

    # ---- artifacts -----------------------------------------------------------------------------
    MAX_UPLOADS = 16

    def _artifact_frame(self, sb: ManagedSandbox, header: dict[str, Any], body: bytes) -> None:
        """One frame of an artifact a process in the sandbox is saving. The bytes go to the store as they
        arrive; the last frame gets an answer the saving process sees."""
        aid = header["aid"]
        if "name" in header:
            if aid in sb.uploads or len(sb.uploads) >= self.MAX_UPLOADS:
                raise ProtocolError("agent opened an artifact it already has, or too many at once")
            try:
                sb.uploads[aid] = self.artifacts.begin(sb.id, header["name"], str(header.get("cmd", "")),
                                                       sb.policy.artifacts)
            except ArtifactError as exc:
                sb.uploads[aid] = exc
        upload = sb.uploads.get(aid)
        if upload is None:
            raise ProtocolError("agent sent data for an artifact it never opened")
        if isinstance(upload, ArtifactWriter):
            upload.write(body)
        if header["more"]:
            return
        del sb.uploads[aid]
        try:
            if isinstance(upload, ArtifactError):
                raise upload
            info = upload.commit()
        except ArtifactError as exc:
            if not sb.channel.closed:
                sb.runtime.agent.artifact_ack(aid, ok=False, message=str(exc))
            return
        self._record(sb, "artifact.save", {"name": info.name, "size": info.size, "sha256": info.sha256,
                                           "cmd": info.command})
        if not sb.channel.closed:
            sb.runtime.agent.artifact_ack(aid, ok=True, size=info.size, sha256=info.sha256)

    # ---- code contexts -------------------------------------------------------------------------
    def _context(self, sb: ManagedSandbox, context_id: str) -> CodeContext:
        ctx = sb.contexts.get(context_id)
        if ctx is None:
            raise SandboxNotFoundError(f"code context {context_id!r} does not exist in sandbox {sb.id}")
        return ctx

    async def create_context(self, sandbox_id: str, language: str = "python", cwd: str | None = None,
                             context_id: str | None = None) -> CodeContext:
        sb = self.get(sandbox_id)
        if language not in LANGUAGES:
            raise PolicyError("language", f"unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
        ctx = CodeContext(context_id or "ctx-" + secrets.token_hex(6), language, cwd or sb.layout.home)
        sb.contexts[ctx.id] = ctx
        async with ctx.lock:
            await self._start_context(sb, ctx)
        return ctx

    async def _start_context(self, sb: ManagedSandbox, ctx: CodeContext) -> None:
        pending = CellPending(sb.policy.limits.output)
        sb.runtime.agent.ctx_start(pending, ctx.id, language=ctx.language, cwd=ctx.cwd, python=sb.runtime.python,
                                   limit=sb.policy.limits.output, timeout=CONTEXT_START_TIMEOUT)
        try:
            ready = await asyncio.wait_for(asyncio.shield(pending.done), CONTEXT_START_TIMEOUT + 5)
        except FilesystemError as exc:
            hint = " (javascript contexts need node under /usr on the host)" if ctx.language == "javascript" else ""
            raise SandboxUnavailableError(f"cannot start a {ctx.language} context: {exc}{hint}") from None
        if ready.get("ev") == "cell_done":  # it died while starting
            err = pending.output["stderr"].decode("utf-8", "replace")[-2000:]
            raise SandboxUnavailableError(f"the {ctx.language} interpreter did not start: {err.strip()}")
        ctx.backend = str(ready.get("backend", ""))[:40]
        ctx.alive = True

    async def run_code(self, sandbox_id: str, code: str, *, language: str = "python", context_id: str | None = None,
                       envs: Mapping[str, str] | None = None, timeout: float | None = None,
                       on_output: Callable[[str, bytes], None] | None = None,
                       on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], CellPending]:
        sb = self.get(sandbox_id)
        if not isinstance(code, str):
            raise PolicyError("code", "must be a string")
        if context_id is None:
            context_id = f"default-{language}"
            if context_id not in sb.contexts:
                await self.create_context(sandbox_id, language, context_id=context_id)
        ctx = self._context(sb, context_id)
        limit = self._command_timeout(sb, timeout, background=False)
        async with ctx.lock:
            if not ctx.alive:
                await self._start_context(sb, ctx)
            pending = CellPending(sb.policy.limits.output, on_output, on_event)
            oom_before = sb.runtime.oom_kills()
            env = check_envs(envs)
            self._record(sb, "code.run", {"context": ctx.id, "language": ctx.language, "code": code,
                                          "env_names": sorted(env)})
            started = time.monotonic()
            sb.busy += 1
            try:
                sb.runtime.agent.ctx_run(pending, ctx.id, code, env=env, timeout=limit, limit=sb.policy.limits.output)
                done = await asyncio.wait_for(asyncio.shield(pending.done), (limit or 0) + 10 if limit else None)
            finally:
                sb.busy -= 1
                sb.last_active = self.loop.time()
            hit = self._cell_limit_hit(sb, done, limit, oom_before)
            if hit is not None:  # said last, so it is the Execution's error
                pending.events.append(hit)
                if on_event is not None:
                    on_event(hit)
            errors = [e for e in pending.events if e.get("type") == "error"][-1:]
            self._record(sb, "code.end", {"context": ctx.id, "execution_count": done.get("execution_count"),
                                          "timed_out": bool(done.get("timed_out")),
                                          "duration": round(time.monotonic() - started, 6),
                                          "error": errors[0] if errors else None,
                                          **self._recorded_output(sb, pending)})
            if done.get("restarted"):
                ctx.alive = False
            return done, pending

    async def restart_context(self, sandbox_id: str, context_id: str) -> CodeContext:
        sb = self.get(sandbox_id)
        ctx = self._context(sb, context_id)
        await self._stop_context(sb, ctx)
        async with ctx.lock:
            await self._start_context(sb, ctx)
        return ctx

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        sb = self.get(sandbox_id)
        ctx = self._context(sb, context_id)
        await self._stop_context(sb, ctx)
        del sb.contexts[context_id]

    async def _stop_context(self, sb: ManagedSandbox, ctx: CodeContext) -> None:
        await sb.runtime.agent.ctx_stop(ctx.id)
        async with ctx.lock:  # a running cell ends (killed) before the context is reused
            ctx.alive = False
        # the agent forgets the context when it reaps the process; wait for that before a restart
        for _ in range(200):
            procs = await sb.runtime.agent.ctx_list()
            if ctx.id not in procs.get("contexts", []):
                return
            await asyncio.sleep(0.01)

    def list_contexts(self, sandbox_id: str) -> builtins.list[CodeContext]:
        return builtins.list(self.get(sandbox_id).contexts.values())

    # ---- files ---------------------------------------------------------------------------------
    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        """stat, list, mkdir, remove or rename (``agent_client.FILE_OPS``): the agent's answer header."""
        sb = self.get(sandbox_id)
        if op not in FILE_OPS:
            raise PolicyError("op", f"unknown file operation {op!r}; one of {', '.join(FILE_OPS)}")
        extra = sorted(set(args) - set(FILE_OPS[op]))
        if extra:
            raise PolicyError(extra[0], f"{op} takes only {' and '.join(FILE_OPS[op])}")
        if op not in ("stat", "list"):  # changes are recorded; looking is not
            self._record(sb, "file.op", {"op": op, **{k: v for k, v in args.items() if isinstance(v, str | int)}})
        return await sb.runtime.agent.file_op(op, args)

    async def open_read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        """Open a file for a streamed read: a refusal (ENOENT, EISDIR...) raises here, the chunks follow as
        the generator is iterated. A read left unfinished is cancelled in the agent; either way it is
        recorded (size, and sha256 when complete)."""
        sb = self.get(sandbox_id)
        pending = ReadPending()
        rid = sb.runtime.agent.read(pending, path)
        await pending.done
        return self._read_chunks(sb, pending, rid, path)

    async def _read_chunks(self, sb: ManagedSandbox, pending: ReadPending, rid: int,
                           path: str) -> AsyncGenerator[bytes, None]:
        digest, size, ended = hashlib.sha256(), 0, False
        try:
            while (item := await pending.chunks.get()) is not None:
                if isinstance(item, BaseException):
                    ended = True  # refused midway: the error says so
                    raise item
                digest.update(item)
                size += len(item)
                pending.outstanding += 1
                if not sb.channel.closed:
                    sb.runtime.agent.credit(rid)
                yield item
            ended = True
            self._record(sb, "file.read", {"path": path, "size": size, "complete": True,
                                           "sha256": digest.hexdigest()})
        finally:
            if not ended:
                self._record(sb, "file.read", {"path": path, "size": size, "complete": False})
                if not sb.channel.closed:
                    sb.runtime.agent.cancel(rid)

    async def write_chunks(self, sandbox_id: str, path: str, chunks: Any, append: bool = False) -> int:
        """Stream ``chunks`` (an async iterator of bytes) to ``path``; returns the bytes written."""
        sb = self.get(sandbox_id)
        from .runtime.channel import Pending

        pending = Pending()
        rid = 0
        digest, sent = hashlib.sha256(), 0
        async for chunk in _rechunk(chunks):
            digest.update(chunk)
            sent += len(chunk)
            if pending.done.done():  # the agent already refused (ENOSPC, EACCES...)
                break
            rid = sb.runtime.agent.write(pending, path, chunk, append=append, more=True, rid=rid)
            await sb.channel.drain()
        # the last frame, also after a refusal: it lets the agent forget the request
        sb.runtime.agent.write(pending, path, b"", append=append, more=False, rid=rid)
        try:
            result = await asyncio.wait_for(pending.done, 60)
        except Exception as exc:
            self._record(sb, "file.write", {"path": path, "size": sent, "append": append, "error": str(exc)[:500]})
            raise
        size = result.get("size")
        self._record(sb, "file.write", {"path": path, "size": sent, "sha256": digest.hexdigest(), "append": append})
        return size if isinstance(size, int) else 0


async def _rechunk(chunks: Any) -> Any:
    async for data in chunks:
        view = memoryview(bytes(data))
        while view:
            yield bytes(view[:protocol.CHUNK])
            view = view[protocol.CHUNK:]


def _oom_killed_since(before: int | None, after: int | None) -> bool:
    """Whether the memory cgroup's OOM-kill counter rose between two readings (None: no counter)."""
    return before is not None and after is not None and after > before


def _with_timeout(policy: Policy, seconds: float) -> Policy:
    """The policy with lifetime.timeout set to the sandbox's effective time to live."""
    return policy.model_copy(update={"lifetime": policy.lifetime.model_copy(update={"timeout": float(seconds)})})
