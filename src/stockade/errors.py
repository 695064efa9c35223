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


class UnenforceableError(SandboxUnavailableError):
    """The policy asks for controls this host cannot apply (e.g. cgroup limits without root). Fix the
    host, or accept the weaker sandbox with ``allow_missing_controls``."""


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


class AuthenticationError(StockadeError):
    """The server refused the API key (missing, malformed, unknown or revoked)."""


class QuotaError(StockadeError):
    """Over a tenant's quota or a key's request rate. ``retry_after`` is in seconds when the server gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ServerConnectionError(SandboxUnavailableError):
    """The stockade server could not be reached, or the connection to it failed mid-request (refused,
    reset, a name that does not resolve, a TLS failure). The message names the URL and the request."""


class ServerResponseError(ServerConnectionError):
    """What answered is not the stockade API (e.g. a proxy in between answered with HTML, or the body is
    not JSON): the message names the URL, the request, the status and the start of what came back."""


class ConflictError(StockadeError):
    """The request conflicts with existing state, e.g. the user already has a sandbox."""


class RequestError(StockadeError):
    """The server refused a malformed request (wrong types, too large)."""


# The wire form of errors: the server answers {code, message, ...} with the status, the remote SDK raises
# the same class again. Order matters: subclasses before their bases.
WIRE_ERRORS: list[tuple[type[StockadeError], str, int]] = [
    (PolicyError, "invalid_policy", 400),
    (PathNotFoundError, "path_not_found", 404),
    (FilesystemError, "filesystem_error", 400),
    (SandboxNotFoundError, "not_found", 404),
    (UnenforceableError, "unenforceable_policy", 422),
    (AuthenticationError, "unauthorized", 401),
    (QuotaError, "quota_exceeded", 429),
    (ConflictError, "conflict", 409),
    (TimeoutError, "timeout", 504),
    (ProtocolError, "protocol_error", 502),
    (SandboxUnavailableError, "sandbox_unavailable", 503),
    (RequestError, "invalid_request", 400),
]


def to_wire(exc: StockadeError) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body) for an error."""
    for cls, code, status in WIRE_ERRORS:
        if isinstance(exc, cls):
            body: dict[str, object] = {"code": code, "message": str(exc)}
            if isinstance(exc, PolicyError):
                body["field"] = exc.field
            if isinstance(exc, FilesystemError):
                body["errno"] = exc.errno_name
            if isinstance(exc, QuotaError) and exc.retry_after:
                body["retry_after"] = round(exc.retry_after, 3)
            return status, body
    return 400, {"code": "error", "message": str(exc)}


def from_wire(status: int, body: object) -> StockadeError:
    """The error a server's answer stands for."""
    data = body if isinstance(body, dict) else {}
    code, message = str(data.get("code", "")), str(data.get("message", f"HTTP {status}"))[:10000]
    if code == "invalid_policy":
        field = str(data.get("field", ""))
        return PolicyError(field, message.removeprefix(f"{field}: ") if field else message)
    if code in ("path_not_found", "filesystem_error"):
        return filesystem_error(str(data.get("errno", "EIO")), message)
    if code == "quota_exceeded":
        retry = data.get("retry_after")
        return QuotaError(message, float(retry) if isinstance(retry, int | float) else None)
    if code == "artifact_error":
        from .artifacts import ArtifactError

        return ArtifactError(message)
    for cls, wire_code, _ in WIRE_ERRORS:
        if wire_code == code and cls not in (PolicyError, FilesystemError, PathNotFoundError):
            return cls(message)
    return StockadeError(f"server error {status}: {message}")
