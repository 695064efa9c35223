"""The local transport: sandboxes run on this host, owned by this process. No server needed."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from ...artifacts import ArtifactInfo
from ...audit import Audit
from ...audit.events import EventFilter
from ...config import HostConfig
from ...core.manager import Manager
from ...core.sandboxes import Argv, CodeContext, CommandRecord, ManagedSandbox
from ...errors import SandboxUnavailableError
from ...policy import Policy
from ..code import Context
from ..models import CommandResult, ProcessInfo, SandboxInfo, SandboxMetrics
from .base import EventSink, OutputSink, Transport


class LocalTransport(Transport):
    def __init__(self) -> None:
        self._manager: Manager | None = None
        self._starting: asyncio.Lock | None = None

    async def manager(self) -> Manager:
        if self._manager is not None:
            return self._manager
        if self._starting is None:  # made on the portal loop; concurrent first callers share one start
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._manager is None:
                self._manager = await self._make_manager()
        return self._manager

    async def _make_manager(self) -> Manager:
        from ...core.build import build_manager

        return await build_manager(HostConfig.from_env())

    async def create(self, policy: Policy, timeout: float | None, envs: Mapping[str, str] | None,
                     metadata: Mapping[str, str] | None, *, user_id: str | None = None,
                     runtime: str | None = None, template: str | None = None) -> SandboxInfo:
        m = await self.manager()
        return self._info(m, await m.create(policy, timeout, envs, metadata, user_id=user_id, runtime=runtime,
                                                  template=template))

    @staticmethod
    def _info(m: Manager, sb: ManagedSandbox) -> SandboxInfo:
        return m.info_of(sb)

    async def info(self, sandbox_id: str) -> SandboxInfo:
        m = await self.manager()
        return self._info(m, m.get(sandbox_id))

    async def list(self) -> list[SandboxInfo]:
        m = await self.manager()
        return [self._info(m, sb) for sb in m.list()]

    async def kill(self, sandbox_id: str) -> bool:
        return await (await self.manager()).kill(sandbox_id)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        (await self.manager()).set_timeout(sandbox_id, seconds)

    async def snapshot(self, sandbox_id: str, name: str | None) -> str:
        return (await (await self.manager()).snapshot(sandbox_id, name)).name

    async def _start(self, sandbox_id: str, cmd: str | Argv, envs: Mapping[str, str] | None,
                     cwd: str | None, stdin: bytes | None, timeout: float | None, on_output: OutputSink | None,
                     background: bool, pty: tuple[int, int] | None = None) -> CommandRecord:
        m = await self.manager()
        return await m.start_command(sandbox_id, cmd, envs=envs, cwd=cwd, stdin=stdin,
                                     stdin_open=background and stdin is None, timeout=timeout,
                                     background=background, on_output=on_output, pty=pty)

    async def run(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                  cwd: str | None, stdin: bytes | None, timeout: float | None,
                  on_output: OutputSink | None) -> CommandResult:
        record = await self._start(sandbox_id, cmd, envs, cwd, stdin, timeout, on_output, background=False)
        return await self.wait(sandbox_id, record)

    async def start(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                    cwd: str | None, stdin: bytes | None, timeout: float | None,
                    on_output: OutputSink | None, background: bool = True,
                    pty: tuple[int, int] | None = None) -> CommandRecord:
        return await self._start(sandbox_id, cmd, envs, cwd, stdin, timeout, on_output, background, pty)

    async def wait(self, sandbox_id: str, token: Any) -> CommandResult:
        record: CommandRecord = token
        try:
            return await (await self.manager()).result_of(sandbox_id, record)
        except SandboxUnavailableError as exc:
            raise SandboxUnavailableError(f"{exc} (while running {record.cmd[:200]!r})") from None

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None:
        await (await self.manager()).send_stdin(sandbox_id, pid, data, eof)

    async def resize(self, sandbox_id: str, pid: int, rows: int, cols: int) -> bool:
        return await (await self.manager()).resize(sandbox_id, pid, rows, cols)

    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool:
        return await (await self.manager()).signal(sandbox_id, pid, sig)

    async def kill_all(self, sandbox_id: str) -> int:
        return await (await self.manager()).kill_all(sandbox_id)

    async def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        return await (await self.manager()).processes(sandbox_id)

    async def metrics(self, sandbox_id: str, start: float | None,
                      end: float | None) -> builtins.list[SandboxMetrics]:
        return await (await self.manager()).metrics(sandbox_id, start, end)

    async def forward_port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        return await (await self.manager()).forward_port(sandbox_id, port)

    async def read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        chunks = await (await self.manager()).open_read(sandbox_id, path)
        async with contextlib.aclosing(chunks):  # a reader that stops early cancels the read
            async for chunk in chunks:
                yield chunk

    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> int:
        return await (await self.manager()).write_chunks(sandbox_id, path, chunks)

    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        return await (await self.manager()).file_op(sandbox_id, op, **args)

    @staticmethod
    def _context(ctx: CodeContext) -> Context:
        return Context(ctx.id, ctx.language, ctx.cwd, ctx.backend)

    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context:
        return self._context(await (await self.manager()).create_context(sandbox_id, language, cwd))

    async def list_contexts(self, sandbox_id: str) -> builtins.list[Context]:
        return [self._context(c) for c in (await self.manager()).list_contexts(sandbox_id)]

    async def restart_context(self, sandbox_id: str, context_id: str) -> Context:
        return self._context(await (await self.manager()).restart_context(sandbox_id, context_id))

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        await (await self.manager()).remove_context(sandbox_id, context_id)

    async def run_code(self, sandbox_id: str, code: str, *, language: str, context_id: str | None,
                       envs: Mapping[str, str] | None, timeout: float | None, on_output: OutputSink,
                       on_event: EventSink) -> dict[str, Any]:
        done, _ = await (await self.manager()).run_code(sandbox_id, code, language=language, context_id=context_id,
                                                         envs=envs, timeout=timeout, on_output=on_output,
                                                         on_event=on_event)
        return done

    async def list_artifacts(self, sandbox_id: str) -> builtins.list[ArtifactInfo]:
        return (await self.manager()).artifacts.list(sandbox_id)

    async def read_artifact(self, sandbox_id: str, name: str) -> AsyncGenerator[bytes, None]:
        path = (await self.manager()).artifacts.open(sandbox_id, name)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    async def update_network(self, sandbox_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return (await self.manager()).update_network(sandbox_id, changes).model_dump()

    async def network_events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        return (await self.manager()).network_events(sandbox_id)

    async def audit_events(self, sandbox_id: str, type: str | None, after_id: int | None,
                           limit: int) -> builtins.list[dict[str, Any]]:
        audit: Audit = (await self.manager()).audit
        await asyncio.to_thread(audit.flush)
        flt = EventFilter(sandbox_id=sandbox_id, type=type, after_id=after_id, limit=limit)
        return [e.to_dict() for e in await asyncio.to_thread(audit.query, flt)]

    async def close(self) -> None:
        if self._manager is not None:
            await self._manager.shutdown()
            await asyncio.to_thread(self._manager.audit.close)
