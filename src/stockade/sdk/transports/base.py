"""What a transport provides. Every method is a coroutine run on the portal loop."""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from ...artifacts import ArtifactInfo
from ...core.sandboxes import Argv
from ...policy import Policy
from ..code import Context
from ..models import CommandResult, ProcessInfo, SandboxInfo, SandboxMetrics

OutputSink = Callable[[str, bytes], None]
EventSink = Callable[[dict[str, Any]], None]


class Transport(ABC):
    @abstractmethod
    async def create(self, policy: Policy, timeout: float | None, envs: Mapping[str, str] | None,
                     metadata: Mapping[str, str] | None, *, user_id: str | None = None,
                     runtime: str | None = None, template: str | None = None) -> SandboxInfo: ...

    @abstractmethod
    async def info(self, sandbox_id: str) -> SandboxInfo: ...

    @abstractmethod
    async def list(self) -> list[SandboxInfo]: ...

    @abstractmethod
    async def kill(self, sandbox_id: str) -> bool: ...

    @abstractmethod
    async def set_timeout(self, sandbox_id: str, seconds: float) -> None: ...

    @abstractmethod
    async def snapshot(self, sandbox_id: str, name: str | None) -> str:
        """Save a template sandbox's files as a new template; its name."""

    @abstractmethod
    async def run(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                  cwd: str | None, stdin: bytes | None, timeout: float | None,
                  on_output: OutputSink | None) -> CommandResult: ...

    @abstractmethod
    async def start(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                    cwd: str | None, stdin: bytes | None, timeout: float | None,
                    on_output: OutputSink | None, background: bool = True,
                    pty: tuple[int, int] | None = None) -> Any:
        """Start a process whose output streams to ``on_output``; returns a token with a ``pid`` and
        ``cmd`` for wait(). ``background=False`` keeps the foreground rules (the command timeout).
        ``pty``: (rows, cols): the process runs on a pseudo-terminal, whose output is stdout."""

    @abstractmethod
    async def wait(self, sandbox_id: str, token: Any) -> CommandResult: ...

    @abstractmethod
    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None: ...

    @abstractmethod
    async def resize(self, sandbox_id: str, pid: int, rows: int, cols: int) -> bool:
        """A pty process's terminal size; False when no such process runs."""

    @abstractmethod
    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool: ...

    @abstractmethod
    async def kill_all(self, sandbox_id: str) -> int: ...

    @abstractmethod
    async def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]: ...

    @abstractmethod
    async def metrics(self, sandbox_id: str, start: float | None,
                      end: float | None) -> builtins.list[SandboxMetrics]: ...

    @abstractmethod
    async def forward_port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """(host, port) on this machine whose connections reach ``port`` inside (policy network.expose)."""

    @abstractmethod
    def read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        """The file's content in chunks, streamed (an async generator)."""

    @abstractmethod
    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> int: ...

    @abstractmethod
    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        """stat, list, mkdir, remove, rename: the agent's answer header."""

    @abstractmethod
    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context: ...

    @abstractmethod
    async def list_contexts(self, sandbox_id: str) -> builtins.list[Context]: ...

    @abstractmethod
    async def restart_context(self, sandbox_id: str, context_id: str) -> Context: ...

    @abstractmethod
    async def remove_context(self, sandbox_id: str, context_id: str) -> None: ...

    @abstractmethod
    async def run_code(self, sandbox_id: str, code: str, *, language: str, context_id: str | None,
                       envs: Mapping[str, str] | None, timeout: float | None, on_output: OutputSink,
                       on_event: EventSink) -> dict[str, Any]:
        """Run a cell; output and interpreter events stream to the sinks; returns the completion
        (execution_count, timed_out, truncated)."""

    @abstractmethod
    async def list_artifacts(self, sandbox_id: str) -> builtins.list[ArtifactInfo]:
        """Artifacts the sandbox saved; available after it ended, until their retention."""

    @abstractmethod
    def read_artifact(self, sandbox_id: str, name: str) -> AsyncGenerator[bytes, None]: ...

    @abstractmethod
    async def update_network(self, sandbox_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a live sandbox's network policy (new connections only); returns the new section."""

    @abstractmethod
    async def network_events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]: ...

    @abstractmethod
    async def audit_events(self, sandbox_id: str, type: str | None, after_id: int | None,
                           limit: int) -> builtins.list[dict[str, Any]]:
        """The sandbox's audit events (also after it ended), oldest first."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the transport holds (at interpreter exit)."""
