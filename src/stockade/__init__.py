"""stockade: run untrusted, AI-written code in throw-away sandboxes on your own machine."""

from .artifacts import ArtifactError, ArtifactInfo
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
from .policy import Policy
from .sdk import (
    Artifacts,
    AsyncArtifacts,
    AsyncCommandHandle,
    AsyncSandbox,
    CommandHandle,
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    ProcessInfo,
    Result,
    Sandbox,
    SandboxInfo,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "ArtifactInfo", "Artifacts", "AsyncArtifacts", "Context", "Execution", "ExecutionError",
    "Logs", "Result", "AsyncCommandHandle", "AsyncSandbox", "CommandError", "CommandHandle", "CommandResult",
    "EntryInfo",
    "FilesystemError", "PathNotFoundError", "Policy", "PolicyError", "ProcessInfo", "ProtocolError", "Sandbox",
    "SandboxInfo", "SandboxNotFoundError", "SandboxUnavailableError", "StockadeError", "TimeoutError",
    "AuthenticationError", "ConflictError", "QuotaError", "UnenforceableError",
]
