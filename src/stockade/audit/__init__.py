"""The audit log: one interface for every event the project records, and its stores."""

from .events import Audit, AuditEvent, NullAudit, Redactor
from .store import SQLAudit

__all__ = ["Audit", "AuditEvent", "NullAudit", "Redactor", "SQLAudit"]
