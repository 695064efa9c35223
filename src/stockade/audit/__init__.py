"""The audit log: one interface for every event the project records, and its stores.

``SQLAudit`` is imported on first use (PEP 562): sqlalchemy is the largest import of the project, and
modules that only make events (the core, the SDK) should not pay for it before a store is opened."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .events import Audit, AuditEvent, NullAudit, Redactor

if TYPE_CHECKING:
    from .store import SQLAudit


def __getattr__(name: str) -> Any:
    if name == "SQLAudit":
        from .store import SQLAudit

        globals()["SQLAudit"] = SQLAudit
        return SQLAudit
    raise AttributeError(f"module 'stockade.audit' has no attribute {name!r}")


__all__ = ["Audit", "AuditEvent", "NullAudit", "Redactor", "SQLAudit"]
