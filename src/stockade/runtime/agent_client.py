"""The agent's operations, spoken from the host: the one place that builds the agent's request headers.

Every runtime runs the same agent over the same channel, so this is shared by all of them; nothing above
it (the core, the server) builds an ``{"op": ...}`` dict. The answers stay untrusted: the channel checks
every frame's shape (``channel.validate``), and callers check the values they use.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from .. import environment
from .channel import AgentChannel, CellPending, CommandPending, Header, Pending, ReadPending, StreamPending
from .port_stream import PortStream

# The file operations the host may ask for, and the arguments each takes (anything else is refused here,
# before it reaches the agent).
FILE_OPS: dict[str, tuple[str, ...]] = {
    "stat": ("path",), "list": ("path", "depth"), "mkdir": ("path",), "remove": ("path",), "rename": ("src", "dst"),
}


class AgentClient:
    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel

    # ---- start and identity --------------------------------------------------------------------
    async def hello(self, env: Mapping[str, str], rlimits: Mapping[str, int], nproc: int, home: str,
                    timeout: float, user: tuple[int, int] | None = None,
                    workspace: environment.VenvLayout | None = None,
                    sysinfo: tuple[bytes, int, int] | None = None) -> Header:
        """The first request: the agent sets its environment and home and lowers its own rlimits before
        anything runs. ``user``: (uid, gid) the agent, started as root, takes for itself and its commands
        while keeping an identity they cannot signal (see the agent's ``become``). ``workspace``: what the
        agent creates in the workspace before anything runs, for a runtime that cannot place it itself.
        ``sysinfo``: (filter, seccomp syscall number, memory) for a runtime whose kernel is the host's: the
        agent answers sysinfo() with ``memory`` from then on (agent/sysinfo.py)."""
        tree = None if workspace is None else {
            "dirs": list(workspace.dirs), "symlinks": [list(pair) for pair in workspace.symlinks],
            "files": [[path, base64.b64encode(content).decode(), mode] for path, content, mode in workspace.files]}
        return await self.channel.call({"op": "hello", "env": dict(env), "rlimits": dict(rlimits), "nproc": nproc,
                                        "home": home, "user": list(user) if user else None, "workspace": tree,
                                        "sysinfo": None if sysinfo is None else {
                                            "filter": base64.b64encode(sysinfo[0]).decode(),
                                            "seccomp_nr": sysinfo[1], "memory": sysinfo[2]}},
                                       timeout=timeout)

    async def setenv(self, env: Mapping[str, str]) -> None:
        await self.channel.call({"op": "setenv", "env": dict(env)})

    async def net_bridge(self, broker: str, http_port: int, socks_port: int, relay: bool = False) -> None:
        """Listen on the proxy ports inside and hand each connection to the broker at ``broker``: its
        descriptor, or (``relay``) its bytes over a connection of its own."""
        await self.channel.call({"op": "net_bridge", "broker": broker, "http_port": http_port,
                                 "socks_port": socks_port, "relay": relay})

    async def net_off(self, http_port: int, socks_port: int) -> None:
        """Answer on the proxy ports that the network is off, with the policy field that opens it."""
        await self.channel.call({"op": "net_off", "http_port": http_port, "socks_port": socks_port})

    async def open_port(self, port: int) -> PortStream:
        """A connection to a TCP port a process listens on inside (127.0.0.1, else ::1), relayed by the
        agent over the channel."""
        return await PortStream(self.channel, port).open()

    # ---- artifacts -----------------------------------------------------------------------------
    def artifacts(self, pending: StreamPending) -> int:
        """The standing request on which artifacts saved inside arrive."""
        return self.channel.start({"op": "artifacts"}, pending)

    def artifact_ack(self, aid: int, *, ok: bool, size: int | None = None, sha256: str | None = None,
                     message: str | None = None) -> None:
        answer: dict[str, Any] = {"op": "artifact_ack", "aid": aid, "ok": ok}
        if ok:
            answer.update(size=size, sha256=sha256)
        else:
            answer["message"] = message
        self.channel.send(answer)

    # ---- processes -----------------------------------------------------------------------------
    def exec(self, pending: CommandPending, cmd: str | Sequence[str], *, env: Mapping[str, str], cwd: str | None,
             timeout: float | None, limit: int, stdin_open: bool, stdin: bytes = b"",
             pty: tuple[int, int] | None = None) -> int:
        """Start a command (a shell line, or an argv run as is); ``stdin`` is its first input, inline.
        ``pty``: (rows, cols) of a pseudo-terminal that is the command's stdin, stdout and stderr and its
        controlling terminal; its output arrives as stdout."""
        header: Header = {"op": "exec", "env": dict(env), "cwd": cwd, "timeout": timeout, "limit": limit,
                          "stdin_open": stdin_open}
        if pty is not None:
            header["pty"] = {"rows": int(pty[0]), "cols": int(pty[1])}
        if isinstance(cmd, str):
            header["cmd"] = cmd
        else:
            header["argv"] = list(cmd)
        return self.channel.start(header, pending, stdin)

    async def stdin(self, pid: int, data: bytes, eof: bool) -> None:
        await self.channel.call({"op": "stdin", "pid": pid, "eof": eof}, data)

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        """A pty process's terminal size; its foreground process group gets SIGWINCH."""
        await self.channel.call({"op": "resize", "pid": int(pid), "rows": int(rows), "cols": int(cols)})

    async def signal(self, pid: int, sig: int) -> None:
        await self.channel.call({"op": "signal", "pid": int(pid), "sig": int(sig)})

    async def kill_all(self) -> Header:
        return await self.channel.call({"op": "kill_all"})

    async def ps(self) -> Header:
        return await self.channel.call({"op": "ps"})

    async def usage(self) -> Header:
        """cpu_seconds, rss_bytes, processes, disk_used, disk_total (the workspace's filesystem)."""
        return await self.channel.call({"op": "usage"})

    # ---- code contexts -------------------------------------------------------------------------
    def ctx_start(self, pending: CellPending, ctx: str, *, language: str, cwd: str, python: list[str], limit: int,
                  timeout: float, script: str = "interpreter.pyc") -> int:
        return self.channel.start({"op": "ctx_start", "ctx": ctx, "language": language, "cwd": cwd,
                                   "python": python, "script": script, "limit": limit, "timeout": timeout,
                                   "env": {}}, pending)

    def ctx_run(self, pending: CellPending, ctx: str, code: str, *, env: Mapping[str, str], timeout: float | None,
                limit: int) -> int:
        return self.channel.start({"op": "ctx_run", "ctx": ctx, "code": code, "env": dict(env), "timeout": timeout,
                                   "limit": limit}, pending)

    async def ctx_stop(self, ctx: str) -> None:
        await self.channel.call({"op": "ctx_stop", "ctx": ctx})

    async def ctx_list(self) -> Header:
        return await self.channel.call({"op": "ctx_list"})

    # ---- files ---------------------------------------------------------------------------------
    async def file_op(self, op: str, args: Mapping[str, Any]) -> Header:
        """stat, list, mkdir, remove or rename, with exactly the arguments that op takes."""
        names = FILE_OPS.get(op)
        if names is None:
            raise ValueError(f"unknown file operation {op!r}")
        extra = set(args) - set(names)
        if extra:
            raise ValueError(f"{op} takes no {sorted(extra)[0]!r}")
        return await self.channel.call({"op": op, **{k: args[k] for k in names if k in args}})

    def read(self, pending: ReadPending, path: str) -> int:
        return self.channel.start({"op": "read", "path": path}, pending)

    def credit(self, rid: int, n: int = 1) -> None:
        self.channel.send({"op": "credit", "id": rid, "n": n})

    def cancel(self, rid: int) -> None:
        self.channel.forget(rid)
        self.channel.send({"op": "cancel", "id": rid})

    def write(self, pending: Pending, path: str, chunk: bytes, *, append: bool, more: bool, rid: int = 0) -> int:
        """One chunk of a streamed write; the first (rid 0) opens the request, the last has more=False."""
        header: Header = {"op": "write", "path": path, "append": append, "more": more}
        if rid == 0:
            return self.channel.start(header, pending, chunk)
        self.channel.send({**header, "id": rid}, chunk)
        return rid
