"""The event model and the interface everything writes through.

Event types: ``api.request``, ``audit.query`` (a read of the audit log), ``sandbox.create``,
``sandbox.timeout``, ``sandbox.end``, ``command.start`` (with ``pty`` {rows, cols} for a terminal),
``command.resize`` (a terminal's new size), ``command.end``, ``code.run``, ``code.end``,
``file.read``, ``file.write``, ``file.op``, ``artifact.save``, ``network.connection``, ``network.update``.
``data`` is a JSON object.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

REDACTED = "[REDACTED]"


@dataclass(frozen=True)
class AuditEvent:
    type: str
    data: dict[str, Any]
    sandbox_id: str | None = None
    tenant: str | None = None
    user_id: str | None = None
    time: float = field(default_factory=time.time)
    id: int | None = None               # assigned by the store

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "type": self.type, "tenant": self.tenant,
                "sandbox_id": self.sandbox_id, "user_id": self.user_id, "data": self.data}


@dataclass(frozen=True)
class EventFilter:
    tenant: str | None = None
    sandbox_id: str | None = None
    user_id: str | None = None
    type: str | None = None             # "command" matches command.start and command.end too
    since: float | None = None
    until: float | None = None
    after_id: int | None = None
    limit: int = 1000
    exclude_type: str | None = None     # leave this type out (the /events route hides its own queries)


class Audit(ABC):
    @property
    def state(self) -> str:
        """"ok", or "failing" while the store cannot be written (see SQLAudit)."""
        return "ok"

    @property
    def error(self) -> str | None:
        """Why the store is failing."""
        return None

    @property
    def held(self) -> int:
        """Events recorded but not yet written because the store is failing."""
        return 0

    async def commit(self) -> bool:
        """Wait until the events recorded so far are in the store; False if the store is failing."""
        return True

    @abstractmethod
    def record(self, event: AuditEvent) -> None:
        """Queue one event. Never waits for the store unless a large backlog builds up."""

    @abstractmethod
    def query(self, flt: EventFilter) -> list[AuditEvent]:
        """Events in id order (oldest first); recorded events are visible after flush()."""

    @abstractmethod
    def prune(self, before: float) -> int:
        """Delete events older than ``before``; returns how many."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every event recorded so far is in the store."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store."""


class NullAudit(Audit):
    """Keeps nothing: for unit tests of parts that need an Audit."""

    def record(self, event: AuditEvent) -> None:
        pass

    def query(self, flt: EventFilter) -> list[AuditEvent]:
        return []

    def prune(self, before: float) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Redactor:
    """Replaces secret values wherever they would surface in a recorded event."""

    def __init__(self, values: Iterable[bytes | str] = ()) -> None:
        self.values = sorted({v.decode() if isinstance(v, bytes) else v for v in values if v}, key=len,
                             reverse=True)

    def __call__(self, value: Any) -> Any:
        if not self.values:
            return value
        if isinstance(value, str):
            for secret in self.values:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        return value
