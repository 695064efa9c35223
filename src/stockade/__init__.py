"""stockade: run untrusted, AI-written code in throw-away sandboxes on your own machine.

The names below are imported on first use (PEP 562), so ``import stockade.policy`` or the ``stockade``
command pays only for the modules it uses (the SDK, the audit store and pydantic are not free)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    CommandError,
    ConflictError,
    FilesystemError,
    PathNotFoundError,
    PolicyError,
    ProtocolError,
    QuotaError,
    SandboxNotFoundError,
    SandboxUnavailableError,
    StockadeError,
    TimeoutError,
    UnenforceableError,
)

if TYPE_CHECKING:
    from .artifacts import ArtifactError, ArtifactInfo
    from .policy import Policy
    from .sdk import (
        Artifacts,
        AsyncArtifacts,
        AsyncCommandHandle,
        AsyncPtyHandle,
        AsyncSandbox,
        CommandHandle,
        CommandResult,
        Context,
        EntryInfo,
        Execution,
        ExecutionError,
        Logs,
        ProcessInfo,
        PtyHandle,
        PtySize,
        Result,
        Sandbox,
        SandboxInfo,
        SandboxMetrics,
    )

__version__ = "0.1.0"

_LAZY = {
    "ArtifactError": ".artifacts", "ArtifactInfo": ".artifacts", "Policy": ".policy",
    **dict.fromkeys((
        "Artifacts", "AsyncArtifacts", "AsyncCommandHandle", "AsyncSandbox", "CommandHandle", "CommandResult",
        "Context", "EntryInfo", "Execution", "ExecutionError", "Logs", "ProcessInfo", "Result", "Sandbox",
        "SandboxInfo", "SandboxMetrics", "AsyncPtyHandle", "PtyHandle", "PtySize"), ".sdk"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stockade' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ArtifactError", "ArtifactInfo", "Artifacts", "AsyncArtifacts", "Context", "Execution", "ExecutionError",
    "Logs", "Result", "AsyncCommandHandle", "AsyncSandbox", "CommandError", "CommandHandle", "CommandResult",
    "EntryInfo",
    "FilesystemError", "PathNotFoundError", "Policy", "PolicyError", "ProcessInfo", "ProtocolError", "Sandbox",
    "SandboxInfo", "SandboxMetrics", "SandboxNotFoundError", "SandboxUnavailableError", "StockadeError", "TimeoutError",
    "AuthenticationError", "ConflictError", "QuotaError", "UnenforceableError", "AsyncPtyHandle", "PtyHandle",
    "PtySize",
]
