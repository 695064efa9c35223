"""The framed protocol between host and agent, shared by both sides.

It also runs INSIDE the sandbox as part of the agent, so it imports only modules that are built into
the interpreter (``_json`` is the C half of ``json``): a cold sandbox start pays for every import.

A frame is ``u32 length | u32 header length | JSON header | body bytes`` (big-endian), where
``length`` counts everything after itself. The header is a JSON object; the body carries raw bytes
(file content, command output, stdin), so binary data never goes through JSON. The transport is any
reliable byte stream (a socketpair here; vsock or a serial line for a microVM): nothing here knows
how the bytes travel.
"""

from __future__ import annotations

import _json
import math

VERSION = 1
CHUNK = 64 * 1024                       # body size used for streamed data
MAX_HEADER = 1024 * 1024                # a header bigger than this is refused
MAX_FRAME = MAX_HEADER + 4 * CHUNK      # a frame bigger than this is refused
READ_WINDOW = 16                        # file-read chunks the agent may send ahead of the host's credit
PREFIX_SIZE = 8


class FrameError(Exception):
    """A frame violates the protocol: the stream is unusable from here on."""


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


class _DecoderContext:
    # The attributes json.JSONDecoder hands to the C scanner: strict JSON, no NaN/Infinity.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constants)
    memo: dict[str, str] = {}


_scan = _json.make_scanner(_DecoderContext())  # type: ignore[arg-type]
_quote = _json.encode_basestring_ascii


def dumps(obj: object) -> str:
    """Compact JSON for the types headers use: dict with str keys, list, str, int, float, bool, None."""
    if isinstance(obj, str):
        return _quote(obj)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise FrameError("non-finite number in a header")
        return float.__repr__(obj)
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise FrameError("header keys must be strings")
        return "{" + ",".join(_quote(k) + ":" + dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    raise FrameError(f"cannot encode {type(obj).__name__} in a header")


def loads(text: str) -> object:
    try:
        obj, end = _scan(text, 0)
    except StopIteration:
        raise FrameError("header is not JSON") from None
    except Exception as exc:  # the C scanner's errors (ValueError, RecursionError, SystemError)
        raise FrameError(f"header is not JSON: {type(exc).__name__}") from None
    if end != len(text):
        raise FrameError("trailing bytes after the JSON header")
    return obj


def encode(header: dict[str, object], body: bytes = b"") -> bytes:
    head = dumps(header).encode("ascii")
    if len(head) > MAX_HEADER:
        raise FrameError(f"header of {len(head)} bytes exceeds {MAX_HEADER}")
    size = 4 + len(head) + len(body)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return size.to_bytes(4, "big") + len(head).to_bytes(4, "big") + head + body


def parse_prefix(prefix: bytes) -> tuple[int, int]:
    """(bytes still to read after the prefix, header length); checks the bounds before any read."""
    size = int.from_bytes(prefix[:4], "big")
    head_len = int.from_bytes(prefix[4:8], "big")
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    if head_len > MAX_HEADER or head_len + 4 > size:
        raise FrameError("frame header length is out of bounds")
    return size - 4, head_len


def decode_header(raw: bytes) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("frame header is not UTF-8") from None
    header = loads(text)
    if not isinstance(header, dict):
        raise FrameError("frame header is not a JSON object")
    return header


class FrameDecoder:
    """Incremental decoder for a non-blocking reader: feed bytes, get whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, object], bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= PREFIX_SIZE:
            rest, head_len = parse_prefix(bytes(self._buf[:PREFIX_SIZE]))
            end = PREFIX_SIZE + rest
            if len(self._buf) < end:
                break
            head = bytes(self._buf[PREFIX_SIZE:PREFIX_SIZE + head_len])
            body = bytes(self._buf[PREFIX_SIZE + head_len:end])
            del self._buf[:end]
            frames.append((decode_header(head), body))
        return frames
