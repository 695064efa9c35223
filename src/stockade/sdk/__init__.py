"""The SDK: ``Sandbox`` and ``AsyncSandbox`` over a local or (later) remote transport."""

from .code import Context, Execution, ExecutionError, Logs, Result
from .models import CommandResult, EntryInfo, ProcessInfo, SandboxInfo, SandboxMetrics
from .sandbox import Artifacts, AsyncArtifacts, AsyncCommandHandle, AsyncSandbox, CommandHandle, Sandbox

__all__ = ["Artifacts", "AsyncArtifacts", "Context", "Execution", "ExecutionError", "Logs", "Result",
           "AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "EntryInfo", "ProcessInfo",
           "Sandbox", "SandboxInfo", "SandboxMetrics"]
