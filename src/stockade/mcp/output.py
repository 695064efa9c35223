"""What a tool result may carry back to a model: sandbox output is untrusted data.

Every stream is capped (its head and tail are kept, and the note says which bytes were cut), framed by
lines that carry a boundary token chosen per result (so output cannot fake the end of its own block),
control characters other than newline and tab are escaped, and output that is not text is never pasted:
the result says it was binary and how many bytes. Messages that reach a model pass ``Scrubber`` first,
which replaces the host's own paths and the server's credentials.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policy import Policy

# What one stream may put into a result. A model's context is the scarce resource: 32 KiB of a stream is
# plenty to read a traceback or a table; the whole output stays in the sandbox (or the audit log).
STREAM_CAP = 32 * 1024
_HEAD = STREAM_CAP * 3 // 4

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u0080-\u009f\u2028\u2029]")


def boundary() -> str:
    return secrets.token_hex(4)


def looks_binary(data: bytes) -> bool:
    """Not text: a NUL byte, bytes that are not UTF-8, or many control characters."""
    if b"\x00" in data:
        return True
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the very end by the output cap is still text
        try:
            text = data[:-3].decode("utf-8") if len(data) > 3 else ""
        except UnicodeDecodeError:
            return True
        if not text and data:
            return True
    controls = sum(1 for c in text if c < " " and c not in "\n\t\r\f\b\x1b")
    return controls > max(8, len(text) // 100)


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else
                        f"\\u{ord(m.group()):04x}", text.replace("\r\n", "\n"))


def clip(text: str, cap: int = STREAM_CAP) -> tuple[str, str | None]:
    """The text shown (head and tail of at most ``cap`` bytes) and a note saying what was cut, if anything."""
    data = text.encode("utf-8", "replace")
    if len(data) <= cap:
        return text, None
    head = data[:_HEAD].decode("utf-8", "ignore")
    tail_start = len(data) - (cap - _HEAD)
    tail = data[tail_start:].decode("utf-8", "ignore")
    cut_from, cut_to = len(head.encode()), len(data) - len(tail.encode())
    marker = f"\n[... {cut_to - cut_from} bytes cut here (bytes {cut_from} to {cut_to} of {len(data)}) ...]\n"
    kept = f"cut: showing the first {cut_from} and the last {len(data) - cut_to} of {len(data)} bytes"
    return head + marker + tail, kept


def block(label: str, data: bytes | str, tag: str, note: str | None = None) -> str:
    """One delimited block of untrusted output. ``tag`` is the result's boundary token."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    if isinstance(data, bytes) and looks_binary(raw):
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return (f"[{label}: binary output, {len(raw)} bytes, not shown (sha256 {digest}...); write it to a file "
                "and inspect it with a tool such as `xxd | head` or `file`]")
    text = data if isinstance(data, str) else raw.decode("utf-8", "replace")
    shown, cut = clip(text)
    notes = "; ".join(n for n in (note, cut) if n)
    header = f"----- {label} ({len(raw)} bytes{'; ' + notes if notes else ''}) [{tag}] -----"
    return f"{header}\n{_escape(shown)}\n----- end of {label} [{tag}] -----"


class Scrubber:
    """Replaces what a result must never show: the host's paths (state and data directories, the sandbox
    environment's host directory, this program's installation, its working and home directories) and
    secret strings (the server's API key, the MCP bearer token). Applied to every text a tool returns,
    program output included (a sandbox's /proc/self/mountinfo names the host directories bound into it)."""

    def __init__(self, secret_values: Iterable[str | None] = (), paths: Iterable[str | Path] = ()) -> None:
        secrets_ = sorted({s for s in secret_values if s and len(s) >= 6}, key=len, reverse=True)
        found = {str(p).rstrip("/") for p in paths if str(p).startswith("/") and len(str(p).rstrip("/")) > 1}
        self.paths = sorted(found, key=len, reverse=True)
        self.secrets = secrets_
        parts = []
        if secrets_:
            parts.append("(?P<secret>" + "|".join(re.escape(v) for v in secrets_) + ")")
        if self.paths:
            parts.append("(?P<path>(?:" + "|".join(re.escape(p) for p in self.paths) + r")(?=/|\b|$))")
        self._pattern = re.compile("|".join(parts)) if parts else None

    def with_secret(self, value: str) -> Scrubber:
        """This scrubber, also replacing ``value``."""
        return Scrubber([*self.secrets, value], self.paths)

    def without_secret(self, value: str) -> Scrubber:
        return Scrubber([v for v in self.secrets if v != value], self.paths)

    @classmethod
    def for_host(cls, secret_values: Iterable[str | None] = (), policy: Policy | None = None,
                 local: bool = True) -> Scrubber:
        """For this host, plus what the policy names of it: mount sources, CA files, and (sandboxes run
        here) the secrets' values, read from where the broker reads them."""
        from ..config import HostConfig

        secret_values = list(secret_values)
        extra_paths: list[str] = []
        if policy is not None:
            extra_paths += [m.source for m in policy.filesystem.mounts]
            extra_paths += [policy.network.extra_ca_certs] if policy.network.extra_ca_certs else []
            for sec in policy.secrets.values():
                kind, _, where = sec.value_from.partition(":")
                if kind == "file":
                    extra_paths.append(where)
                if local and kind == "env":
                    secret_values.append(os.environ.get(where))
                elif local and kind == "file":
                    try:
                        with open(where, "rb") as f:
                            secret_values.append(f.read(1 << 16).decode("utf-8", "replace").strip())
                    except OSError:
                        pass
        cfg = HostConfig.from_env()
        here = Path(__file__).resolve().parents[1]  # the stockade package
        candidates: list[str | Path] = [cfg.state_dir, cfg.data_dir, cfg.sandbox_env, here, here.parent,
                                        sys.prefix, sys.base_prefix, os.getcwd(), *extra_paths]
        home = os.path.expanduser("~")
        if home not in ("/", "/home/user"):
            candidates.append(home)
        # paths a sandbox legitimately names are never replaced
        inside = ("/home/user", "/tmp", "/opt/stockade", "/usr", "/run/stockade", "/dev/shm")
        return cls(secret_values, [p for p in candidates if str(p).rstrip("/") not in inside])

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: "[redacted]" if m.lastgroup == "secret" else "<host path>", text)
