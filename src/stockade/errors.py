"""The public error types. Messages say what happened and what to do next: agents read them too."""

from __future__ import annotations

import builtins


class StockadeError(Exception):
    """Base of every error stockade raises."""


class PolicyError(StockadeError, ValueError):
    """The policy is invalid. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class SandboxNotFoundError(StockadeError, LookupError):
    """No live sandbox with that id is visible to the caller."""


class SandboxUnavailableError(StockadeError):
    """This host cannot run a sandbox (or this one died). ``advice`` is what `stockade doctor` says."""

    def __init__(self, message: str, advice: str = "") -> None:
        self.advice = advice
        super().__init__(message + (f"\n{advice}" if advice else ""))


class CommandError(StockadeError):
    """A command exited non-zero with ``check=True``; carries its result."""

    def __init__(self, result: object, message: str) -> None:
        self.result = result
        super().__init__(message)


class TimeoutError(StockadeError, builtins.TimeoutError):  # noqa: A001 - deliberately compatible
    """A command (with ``check=True``) or a request to the sandbox ran past its time limit. Also an
    instance of the builtin TimeoutError. ``result`` holds the command's result when there is one."""

    def __init__(self, message: str, result: object = None) -> None:
        self.result = result
        super().__init__(message)


class FilesystemError(StockadeError, OSError):
    """A file operation inside the sandbox failed; ``errno_name`` is e.g. ENOENT or ENOSPC."""

    def __init__(self, errno_name: str, message: str) -> None:
        self.errno_name = errno_name
        StockadeError.__init__(self, message)


class PathNotFoundError(FilesystemError, FileNotFoundError):
    """The path does not exist inside the sandbox."""


def filesystem_error(errno_name: str, message: str) -> FilesystemError:
    cls = PathNotFoundError if errno_name == "ENOENT" else FilesystemError
    return cls(errno_name, message)


class ProtocolError(StockadeError):
    """The sandbox's agent sent something the host refuses (malformed, oversized, out of order)."""
