"""The SDK: ``Sandbox`` and ``AsyncSandbox`` over a local or (later) remote transport."""

from .code import Context, Execution, ExecutionError, Logs, Result
from .models import CommandResult, EntryInfo, ProcessInfo, PtySize, SandboxInfo, SandboxMetrics
from .sandbox import (
    Artifacts,
    AsyncArtifacts,
    AsyncCommandHandle,
    AsyncPtyHandle,
    AsyncSandbox,
    CommandHandle,
    PtyHandle,
    Sandbox,
)

__all__ = ["Artifacts", "AsyncArtifacts", "Context", "Execution", "ExecutionError", "Logs", "Result",
           "AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "EntryInfo", "ProcessInfo",
           "AsyncPtyHandle", "PtyHandle", "PtySize", "Sandbox", "SandboxInfo", "SandboxMetrics"]
