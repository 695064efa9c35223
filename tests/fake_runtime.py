"""A runtime for tests of the core, the server and the SDK without the jail: the real agent over a
socketpair, in fresh user, PID, mount, network and IPC namespaces made by util-linux's `unshare`, with no
bwrap, seccomp, cgroups, read-only root or per-sandbox uid. It isolates nothing a test relies on for
security (the jail's own tests run the real thing) and is never registered: users cannot pick it.

The namespaces are there so the agent stays harmless as a stand-in: `kill_all` signals only the processes
of its own PID namespace, its artifact socket's abstract name is its network namespace's own, and /proc is
its namespace's. Its home is a temporary directory per sandbox (SandboxLayout.home), removed at stop. It
has no root of its own, so a template is refused (PolicyError on ``template``), before anything is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from stockade.config import HostConfig
from stockade.errors import PolicyError, SandboxUnavailableError
from stockade.runtime.agent_files import compiled_agent
from stockade.runtime.base import Runtime, RuntimeSandbox, SandboxLayout, SandboxSpec
from stockade.runtime.channel import AgentChannel
from stockade.runtime.jail.rootfs import system_image

UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc", "--net",
           "--ipc"]


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config or HostConfig.from_env()
        self.root = Path(tempfile.mkdtemp(prefix="stockade-fake-runtime-"))
        self.python = system_image(None).python_host
        agent_dir = self.root / "agent"
        agent_dir.mkdir()
        for name, data in compiled_agent(self.python, self.root).items():
            (agent_dir / name).write_bytes(data)
        self.agent = agent_dir / "agent.zip"
        self.homes: dict[str, Path] = {}

    async def start(self, spec: SandboxSpec) -> RuntimeSandbox:
        if spec.template is not None:  # refused as a runtime that cannot run templates refuses one (rootless gVisor)
            raise PolicyError("template", "the fake runtime runs no templates: it has no root of its own to put "
                              "a template's layers under; use runtime 'jail' or 'gvisor'")
        if spec.egress is not None:
            raise SandboxUnavailableError("the fake runtime has no egress attachment (use network.mode none)")
        home = self.root / spec.id
        home.mkdir()
        sandbox = FakeSandbox(self, spec.id, home)
        try:
            await sandbox.start(spec.envs)
        except BaseException:
            await sandbox.stop()
            raise
        return sandbox

    async def sweep_stale(self) -> list[str]:
        return []  # everything of a fake sandbox dies with its unshare (--kill-child) and its temp dir

    def leftovers(self, sandbox_id: str, described: Mapping[str, object] | None = None) -> list[str]:
        left = []
        home = self.root / sandbox_id
        if home.exists():
            left.append(f"home directory {home}")
        pid = (described or {}).get("unshare_pid")
        if isinstance(pid, int) and os.path.exists(f"/proc/{pid}") and _cmdline(pid).startswith("unshare"):
            left.append(f"process {pid} (its unshare) still runs")
        return left

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class FakeSandbox(RuntimeSandbox):
    def __init__(self, runtime: FakeRuntime, sandbox_id: str, home: Path) -> None:
        self.runtime, self.id, self.home = runtime, sandbox_id, home
        self.python = [runtime.python]
        self.proc: subprocess.Popen[bytes] | None = None
        self.layout = replace(SandboxLayout(), home=str(home))

    async def start(self, envs: Mapping[str, str]) -> None:
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - a fixed argv
                [*UNSHARE, *self.python, "-E", "-s", "-S", "-B", str(self.runtime.agent), str(agent_sock.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(agent_sock.fileno(),), start_new_session=True, cwd=self.home)
        finally:
            agent_sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        self.channel = AgentChannel(reader, writer)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), **envs}
        await self.agent.hello(env, {"nofile": 1024, "core": 0}, 0, str(self.home), 15.0)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.channel.closed

    def describe(self) -> dict[str, object]:
        return {"runtime": "fake", "unshare_pid": self.proc.pid if self.proc else None}

    async def stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # unshare's --kill-child takes its namespace along
            await asyncio.to_thread(self.proc.wait, 10)
        shutil.rmtree(self.home, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
