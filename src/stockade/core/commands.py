"""Commands in a sandbox, and which limit ended or cut one."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..agent import protocol
from ..errors import FilesystemError, PolicyError, SandboxUnavailableError
from ..policy import format_duration, format_size
from ..runtime.channel import CommandPending
from ..sdk.models import CommandResult, ProcessInfo, SandboxMetrics, check_pty_size
from .base import CoreBase
from .sandboxes import Argv, CommandRecord, ManagedSandbox, check_envs


class Commands(CoreBase):
    """Commands: start, wait, stdin, signals, the limits they hit."""

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
                            background: bool, on_output: Callable[[str, bytes], None] | None,
                            pty: tuple[int, int] | None = None) -> CommandRecord:
        """``pty``: (rows, cols): the command runs on a pseudo-terminal (its output is stdout)."""
        sb = self.get(sandbox_id)
        env = check_envs(envs)
        if pty is not None:
            pty = check_pty_size(pty)
            if stdin:
                raise PolicyError("stdin", "a pty process takes its input through send_stdin")
        limit = self._command_timeout(sb, timeout, background)
        if not isinstance(cmd, str) and (not cmd or not all(isinstance(a, str) for a in cmd)):
            raise PolicyError("cmd", "argv must be a non-empty list of strings")
        pending = CommandPending(sb.policy.limits.output, on_output)
        oom_before = sb.runtime.oom_kills()
        data = stdin or b""
        inline = len(data) <= protocol.CHUNK  # larger stdin follows in chunks
        rid = sb.runtime.agent.exec(pending, cmd, env=env, cwd=cwd, timeout=limit, limit=sb.policy.limits.output,
                                    stdin_open=stdin_open or not inline, stdin=data if inline else b"", pty=pty)
        pid = await pending.started
        record = CommandRecord(pid, rid, cmd if isinstance(cmd, str) else " ".join(cmd), pending, background,
                               limit, oom_before)
        self._record(sb, "command.start", {"pid": pid, ("cmd" if isinstance(cmd, str) else "argv"): cmd,
                                           "cwd": cwd, "env_names": sorted(env), "background": background,
                                           "stdin_bytes": len(data),
                                           **({"pty": {"rows": pty[0], "cols": pty[1]}} if pty else {})})
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
        if exit_.get("code") not in (0, None) and _oom_killed_since(record.oom_before, oom_after):
            # the command survived, but a process of it did not (a shell whose child was killed: exit 137)
            return {"limit": "limits.memory",
                    "error": f"out of memory: the sandbox's memory limit ({format_size(lim.memory)}) was reached and "
                             "the kernel killed a process while the command ran; raise limits.memory"}
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

    async def _wait_command(self, sandbox_id: str, record: CommandRecord) -> dict[str, Any]:
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

    async def result_of(self, sandbox_id: str, record: CommandRecord) -> CommandResult:
        """The command's result once it has ended: what every front end answers."""
        exit_ = await self._wait_command(sandbox_id, record)
        out = record.pending
        return CommandResult.from_exit(exit_, bytes(out.output["stdout"]), bytes(out.output["stderr"]), out.truncated)

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool = False) -> None:
        sb = self.get(sandbox_id)
        view = memoryview(data)
        while True:
            chunk, view = bytes(view[:protocol.CHUNK]), view[protocol.CHUNK:]
            last = not view
            await sb.runtime.agent.stdin(pid, chunk, eof and last)
            if last:
                return

    async def resize(self, sandbox_id: str, pid: int, rows: int, cols: int) -> bool:
        """Resize a pty process's terminal; False when no such process runs."""
        sb = self.get(sandbox_id)
        rows, cols = check_pty_size((rows, cols))
        try:
            await sb.runtime.agent.resize(pid, rows, cols)
        except FilesystemError as exc:
            if exc.errno_name == "ESRCH":
                return False
            if exc.errno_name == "ENOTTY":
                raise PolicyError("pid", f"process {pid} was not started with a terminal (pty.create)") from None
            raise
        self._record(sb, "command.resize", {"pid": pid, "rows": rows, "cols": cols})
        return True

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

    async def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        """The processes running in the sandbox (the agent's answer checked: pids are ints, at most 10000)."""
        sb = self.get(sandbox_id)
        result = await sb.runtime.agent.ps()
        procs = result.get("procs")
        if not isinstance(procs, list):
            raise SandboxUnavailableError("the sandbox's agent answered ps with garbage")
        return [ProcessInfo(p["pid"], str(p.get("cmd", ""))[:4096], p.get("tag") if isinstance(p.get("tag"), str)
                            else None) for p in procs[:10000]
                if isinstance(p, dict) and isinstance(p.get("pid"), int) and not isinstance(p.get("pid"), bool)]

    async def metrics(self, sandbox_id: str, start: float | None = None,
                      end: float | None = None) -> builtins.list[SandboxMetrics]:
        """A sample taken now, after the earlier ones still kept; those between ``start`` and ``end`` (wall
        clock seconds) are returned. The agent's figures are checked: numbers, bounded."""
        sb = self.get(sandbox_id)
        seen = await sb.runtime.agent.usage()
        now = time.time()
        cpu, rss = _number(seen.get("cpu_seconds")), _number(seen.get("rss_bytes"))
        then, cpu_then = sb.cpu_mark or (sb.started_at, 0.0)
        cpus = sb.policy.limits.cpus
        pct = 100.0 * max(0.0, cpu - cpu_then) / (max(now - then, 1e-3) * cpus)
        sb.cpu_mark = (now, cpu)
        charged = sb.runtime.memory_usage()
        used, cache = charged if charged is not None else (int(rss), 0)
        sb.metrics.append(SandboxMetrics(
            datetime.fromtimestamp(now, UTC), max(1, math.ceil(cpus)), round(min(pct, 100.0), 2),
            used, sb.policy.limits.memory, cache, int(_number(seen.get("disk_used"))),
            int(_number(seen.get("disk_total")))))
        return [m for m in sb.metrics if (start is None or m.timestamp.timestamp() >= start)
                and (end is None or m.timestamp.timestamp() <= end)]


def _number(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1 << 62 else 0.0


def _oom_killed_since(before: int | None, after: int | None) -> bool:
    """Whether the memory cgroup's OOM-kill counter rose between two readings (None: no counter)."""
    return before is not None and after is not None and after > before
