"""The Connect protocol (connectrpc.com/docs/protocol), server side, JSON codec only: what the E2B SDKs
speak to envd.

- unary: ``POST /pkg.Service/Method``, ``Content-Type: application/json``, the message as the body; an
  error is a non-200 status with ``{"code": "not_found", "message": ...}``;
- streams: ``application/connect+json``, each message in an envelope (1 byte of flags, a 4-byte big-endian
  length, the JSON), the response ending with an end-of-stream envelope (flag 0x02) holding ``{}`` or
  ``{"error": {...}}``: the JS SDK fails a stream without it.

Written here rather than taken from ``connectrpc`` (the Python SDK's own client library, which also has a
server): its server needs the services' generated protobuf classes, whose schema ships inside the E2B SDK;
stockade's server would then depend on the SDK it stands in for. The JSON codec needs none of that: the
messages are JSON objects in protobuf's JSON mapping (camelCase names, int64 as strings, bytes as
base64, enums by name), built and read by hand in envd.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ...errors import (
    AuthenticationError,
    FilesystemError,
    PolicyError,
    QuotaError,
    RequestError,
    SandboxNotFoundError,
    SandboxUnavailableError,
    StockadeError,
)

END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 4 << 20   # one request message (stdin chunks, paths): the SDKs send far less

HTTP_STATUS = {"canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
               "not_found": 404, "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429,
               "failed_precondition": 400, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
               "internal": 500, "unavailable": 503, "data_loss": 500, "unauthenticated": 401}
ERRNO_CODES = {"ENOENT": "not_found", "EEXIST": "already_exists", "EACCES": "permission_denied",
               "EPERM": "permission_denied", "ENOTDIR": "invalid_argument", "EISDIR": "invalid_argument",
               "EINVAL": "invalid_argument", "ENOTEMPTY": "failed_precondition", "ENOSPC": "resource_exhausted",
               "EDQUOT": "resource_exhausted", "EFBIG": "resource_exhausted", "ESRCH": "not_found",
               "EXDEV": "invalid_argument", "ENAMETOOLONG": "invalid_argument", "ELOOP": "invalid_argument"}


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        assert code in HTTP_STATUS, code
        super().__init__(message)
        self.code, self.message = code, message


def from_stockade(exc: BaseException) -> ConnectError:
    """The Connect error a stockade error stands for (the SDKs map these codes to their exceptions:
    not_found -> NotFoundException / False from exists(), already_exists -> False from make_dir(), ...)."""
    if isinstance(exc, ConnectError):
        return exc
    message = str(exc)
    if isinstance(exc, FilesystemError):
        return ConnectError(ERRNO_CODES.get(exc.errno_name, "unknown"), message)
    if isinstance(exc, SandboxNotFoundError):
        return ConnectError("unavailable", f"{message} (the sandbox was not found)")
    if isinstance(exc, PolicyError | RequestError):
        return ConnectError("invalid_argument", message)
    if isinstance(exc, QuotaError):
        return ConnectError("resource_exhausted", message)
    if isinstance(exc, AuthenticationError):
        return ConnectError("unauthenticated", message)
    if isinstance(exc, TimeoutError):
        return ConnectError("deadline_exceeded", message or "timed out")
    if isinstance(exc, SandboxUnavailableError):
        return ConnectError("unavailable", message)
    if isinstance(exc, StockadeError):
        return ConnectError("internal", message)
    return ConnectError("internal", f"internal error ({type(exc).__name__}); logged on the server")


def unary_error(err: ConnectError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": err.code, "message": err.message}, status_code=HTTP_STATUS[err.code],
                        headers=headers)


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(data)) + data


def end_stream(err: ConnectError | None = None) -> bytes:
    return envelope({} if err is None else {"error": {"code": err.code, "message": err.message}}, END_STREAM)


def _message(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ConnectError("invalid_argument", "the request message is not JSON") from None
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", "the request message must be a JSON object")
    return value


async def unary_request(request: Request) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ConnectError("invalid_argument", f"content type {kind!r}: only the JSON codec (application/json) "
                                               "is served")
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise ConnectError("unimplemented", "compressed requests are not supported")
    return _message(await request.body())


async def stream_requests(request: Request) -> AsyncIterator[dict[str, Any]]:
    """The enveloped messages of a streaming request, as they arrive."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/connect+json":
        raise ConnectError("invalid_argument", f"content type {kind!r}: only application/connect+json is served")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        while len(buf) >= 5:
            flags, length = struct.unpack(">BI", buf[:5])
            if length > MAX_MESSAGE:
                raise ConnectError("resource_exhausted", f"a request message over {MAX_MESSAGE} bytes")
            if len(buf) < 5 + length:
                break
            data, buf = bytes(buf[5:5 + length]), buf[5 + length:]
            if flags & COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if flags & END_STREAM:
                return
            yield _message(data)
    if buf:
        raise ConnectError("invalid_argument", "the request ended inside a message envelope")


async def first_request(request: Request) -> dict[str, Any]:
    """The one message of a server-streaming call."""
    async for message in stream_requests(request):
        return message
    raise ConnectError("invalid_argument", "the request has no message")


def timeout_of(request: Request) -> float | None:
    """The call's deadline (``Connect-Timeout-Ms``) in seconds, None when it has none."""
    raw = request.headers.get("connect-timeout-ms")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise ConnectError("invalid_argument", "Connect-Timeout-Ms must be a positive integer of at most 10 digits")
    return max(int(raw), 1) / 1000
