"""The values the SDK returns. Names follow the E2B SDK where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ..errors import PolicyError


@dataclass(frozen=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int                  # the exit status, or minus the signal that killed it
    truncated: bool = False         # output passed limits.output and was cut
    timed_out: bool = False
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)
    limit: str | None = None        # the policy field whose limit the command hit, e.g. "limits.memory"
    error: str | None = None        # what happened, with the limit's value and the field that raises it

    @classmethod
    def from_exit(cls, exit_event: dict[str, Any], stdout: bytes, stderr: bytes,
                  truncated: dict[str, bool]) -> CommandResult:
        code = exit_event.get("code")
        sig = exit_event.get("signal")
        exit_code = code if isinstance(code, int) else -(sig if isinstance(sig, int) else 9)
        limit, error = exit_event.get("limit"), exit_event.get("error")
        return cls(stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"), exit_code,
                   any(truncated.values()), bool(exit_event.get("timed_out")), bytes(stdout), bytes(stderr),
                   limit if isinstance(limit, str) else None, error if isinstance(error, str) else None)


@dataclass(frozen=True)
class PtySize:
    """A pseudo-terminal's size (E2B's ``PtySize``): rows and columns, each 1 to 4096."""

    rows: int
    cols: int


MAX_PTY_SIZE = 4096  # the agent (agent/processes.py) has the same bound


def check_pty_size(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols), each a whole number from 1 to MAX_PTY_SIZE, else a PolicyError on ``size``."""
    try:
        rows, cols = size
    except (TypeError, ValueError):
        raise PolicyError("size", "a terminal size is (rows, cols)") from None
    for value in (rows, cols):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PTY_SIZE:
            raise PolicyError("size", f"a terminal's rows and cols are whole numbers from 1 to {MAX_PTY_SIZE}")
    return rows, cols


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    cmd: str
    tag: str | None = None


@dataclass(frozen=True)
class SandboxMetrics:
    """One sample of what a sandbox uses (E2B's names). ``cpu_used_pct`` is the average since the sample
    before it (the sandbox's start for the first), 100 per CPU of ``limits.cpus``; memory is what the
    sandbox's memory cgroup is charged (page cache included, as in ``mem_cache``) or, without one, the
    resident memory of its processes; disk is the workspace's filesystem (/home/user)."""

    timestamp: datetime
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "timestamp": self.timestamp.timestamp()}

    @classmethod
    def from_dict(cls, m: dict[str, Any]) -> SandboxMetrics:
        return cls(datetime.fromtimestamp(_float(m.get("timestamp")), UTC), _int(m.get("cpu_count")),
                   _float(m.get("cpu_used_pct")), _int(m.get("mem_used")), _int(m.get("mem_total")),
                   _int(m.get("mem_cache")), _int(m.get("disk_used")), _int(m.get("disk_total")))


@dataclass(frozen=True)
class EntryInfo:
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    modified_time: datetime

    @classmethod
    def from_agent(cls, entry: dict[str, Any]) -> EntryInfo:
        kind = entry.get("type")
        return cls(str(entry.get("name", ""))[:4096], str(entry.get("path", ""))[:4096],
                   kind if kind in ("file", "dir", "symlink", "other") else "other",
                   _int(entry.get("size")), _int(entry.get("mode")),
                   datetime.fromtimestamp(_float(entry.get("mtime"))))

    @classmethod
    def from_stat(cls, result: dict[str, Any]) -> EntryInfo:
        entry = result.get("entry")
        return cls.from_agent(entry if isinstance(entry, dict) else {})

    @classmethod
    def list_from(cls, result: dict[str, Any]) -> list[EntryInfo]:
        entries = result.get("entries")
        return [cls.from_agent(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


@dataclass(frozen=True)
class SandboxInfo:
    sandbox_id: str
    started_at: datetime
    end_at: datetime
    metadata: dict[str, str]
    policy: dict[str, Any]
    runtime: dict[str, Any]
    state: Literal["running", "ended"] = "running"
    user_id: str | None = None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63 else 0


def _float(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e11 else 0.0
