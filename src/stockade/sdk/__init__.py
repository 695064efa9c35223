"""The SDK: ``Sandbox`` and ``AsyncSandbox`` over a local or (later) remote transport."""

from .models import CommandResult, EntryInfo, ProcessInfo, SandboxInfo
from .sandbox import AsyncCommandHandle, AsyncSandbox, CommandHandle, Sandbox

__all__ = ["AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult", "EntryInfo", "ProcessInfo",
           "Sandbox", "SandboxInfo"]
