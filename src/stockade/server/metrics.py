"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..audit import Audit, AuditEvent
from ..audit.events import EventFilter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.alive = Gauge("stockade_sandboxes_alive", "Sandboxes running now", registry=self.registry)
        self.creates = Counter("stockade_sandbox_creates", "Sandboxes created", registry=self.registry)
        self.create_failures = Counter("stockade_sandbox_create_failures", "Creates that failed", ["reason"],
                                       registry=self.registry)
        self.exec_seconds = Histogram("stockade_exec_seconds", "Command round trip through the API",
                                      buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10, 60),
                                      registry=self.registry)
        self.egress = Counter("stockade_egress_decisions", "Egress connection attempts", ["decision"],
                              registry=self.registry)
        self.requests = Counter("stockade_api_requests", "API requests", ["status"], registry=self.registry)
        self.audit_refused = Counter("stockade_audit_refused_requests",
                                     "Requests refused (503) because the audit log could not be written",
                                     registry=self.registry)
        self.audit_failing = Gauge("stockade_audit_store_failing", "1 while the audit log cannot be written",
                                   registry=self.registry)
        self.audit_held = Gauge("stockade_audit_events_held", "Audit events held in memory, not yet written",
                                registry=self.registry)
        self.audit_write_failures = Gauge("stockade_audit_write_failures", "Failed audit store write attempts "
                                          "since the server started", registry=self.registry)

    def watch(self, audit: Audit) -> None:
        self.audit_failing.set_function(lambda: float(audit.state != "ok"))
        self.audit_held.set_function(lambda: float(audit.held))
        self.audit_write_failures.set_function(lambda: float(getattr(audit, "failures", 0)))


class MeteredAudit(Audit):
    """Passes events to the store, counting the ones metrics care about on the way."""

    def __init__(self, inner: Audit, metrics: Metrics) -> None:
        self.inner, self.metrics = inner, metrics

    def record(self, event: AuditEvent) -> None:
        if event.type == "network.connection":
            self.metrics.egress.labels(str(event.data.get("decision", "unknown"))[:16]).inc()
        self.inner.record(event)

    def query(self, flt: EventFilter) -> list[AuditEvent]:
        return self.inner.query(flt)

    def prune(self, before: float) -> int:
        return self.inner.prune(before)

    def flush(self) -> None:
        self.inner.flush()

    async def commit(self) -> bool:
        return await self.inner.commit()

    @property
    def state(self) -> str:
        return self.inner.state

    @property
    def error(self) -> str | None:
        return self.inner.error

    @property
    def held(self) -> int:
        return self.inner.held

    @property
    def failures(self) -> int:
        return int(getattr(self.inner, "failures", 0))

    def close(self) -> None:
        self.inner.close()
