"""stockade: run untrusted, AI-written code in throw-away sandboxes on your own machine."""

from .errors import (
    CommandError,
    FilesystemError,
    PathNotFoundError,
    PolicyError,
    ProtocolError,
    SandboxNotFoundError,
    SandboxUnavailableError,
    StockadeError,
    TimeoutError,
)
from .policy import Policy
from .sdk import (
    AsyncCommandHandle,
    AsyncSandbox,
    CommandHandle,
    CommandResult,
    EntryInfo,
    ProcessInfo,
    Sandbox,
    SandboxInfo,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncCommandHandle", "AsyncSandbox", "CommandError", "CommandHandle", "CommandResult", "EntryInfo",
    "FilesystemError", "PathNotFoundError", "Policy", "PolicyError", "ProcessInfo", "ProtocolError", "Sandbox",
    "SandboxInfo", "SandboxNotFoundError", "SandboxUnavailableError", "StockadeError", "TimeoutError",
]
