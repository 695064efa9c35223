"""What a transport provides. Every method is a coroutine run on the portal loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ...policy import Policy
from ..models import CommandResult, EntryInfo, ProcessInfo, SandboxInfo

OutputSink = Callable[[str, bytes], None]


class Transport(ABC):
    @abstractmethod
    async def create(self, policy: Policy, timeout: float | None, envs: Mapping[str, str] | None,
                     metadata: Mapping[str, str] | None) -> SandboxInfo: ...

    @abstractmethod
    async def info(self, sandbox_id: str) -> SandboxInfo: ...

    @abstractmethod
    async def list(self) -> list[SandboxInfo]: ...

    @abstractmethod
    async def kill(self, sandbox_id: str) -> bool: ...

    @abstractmethod
    async def set_timeout(self, sandbox_id: str, seconds: float) -> None: ...

    @abstractmethod
    async def run(self, sandbox_id: str, cmd: str | list[str], *, envs: Mapping[str, str] | None,
                  cwd: str | None, stdin: bytes | None, timeout: float | None,
                  on_output: OutputSink | None) -> CommandResult: ...

    @abstractmethod
    async def start(self, sandbox_id: str, cmd: str | list[str], *, envs: Mapping[str, str] | None,
                    cwd: str | None, stdin: bytes | None, timeout: float | None,
                    on_output: OutputSink | None, background: bool = True) -> Any:
        """Start a process whose output streams to ``on_output``; returns a token with a ``pid`` and
        ``cmd`` for wait(). ``background=False`` keeps the foreground rules (the command timeout)."""

    @abstractmethod
    async def wait(self, sandbox_id: str, token: Any) -> CommandResult: ...

    @abstractmethod
    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None: ...

    @abstractmethod
    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool: ...

    @abstractmethod
    async def processes(self, sandbox_id: str) -> list[ProcessInfo]: ...

    @abstractmethod
    async def read(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> int: ...

    @abstractmethod
    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        """stat, list, mkdir, remove, rename: the agent's answer header."""

    async def close(self) -> None:
        """Release what the transport holds (at interpreter exit)."""
