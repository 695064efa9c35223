"""The durable store: a table in the host's database (SQLite WAL or PostgreSQL), written by one thread.

Callers only queue events (a lock-free SimpleQueue); a writer thread inserts them in batches, so a
request never waits on a disk flush. A backlog beyond BACKLOG events makes callers wait (back-pressure)
rather than drop records.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..db import events
from .events import Audit, AuditEvent, EventFilter

BACKLOG = 100_000
BATCH = 1000
GATHER = 0.005            # the writer waits this long after a first event for others to share its transaction
MAX_STRING = 1 << 20      # no single value in an event may exceed this (output has its own, lower cap)
log = logging.getLogger("stockade.audit")


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class SQLAudit(Audit):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.written = 0
        self.failures = 0
        self._queue: queue.SimpleQueue[AuditEvent | _Flush | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="stockade-audit", daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        if self._closed:
            return
        while self._queue.qsize() > BACKLOG:  # the store is far behind: slow the producers down
            time.sleep(0.01)
        self._queue.put(event)

    def flush(self) -> None:
        if self._closed:
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self.engine.dispose()

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, AuditEvent) and self._queue.qsize() < BATCH:
                time.sleep(GATHER)
            batch: list[AuditEvent] = []
            markers: list[_Flush] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    batch.append(item)
                if len(batch) >= BATCH or stop:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._insert(batch)
            for m in markers:
                m.done.set()
            if stop:
                return

    def _insert(self, batch: list[AuditEvent]) -> None:
        rows = [{"time": e.time, "type": e.type[:64], "tenant": e.tenant, "sandbox_id": e.sandbox_id,
                 "user_id": e.user_id, "data": _bounded(e.data)} for e in batch]
        for attempt in range(5):  # a database restart or a locked SQLite file: retry, then report loudly
            try:
                with self.engine.begin() as conn:
                    conn.execute(events.insert(), rows)
                self.written += len(rows)
                return
            except sa.exc.SQLAlchemyError as exc:
                self.failures += 1
                log.error("audit store write failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.2 * 2 ** attempt)
        log.critical("audit store unavailable: %d events could not be written", len(rows))

    def query(self, flt: EventFilter) -> list[AuditEvent]:
        c = events.c
        q = sa.select(events).order_by(c.id).limit(max(1, min(flt.limit, 10_000)))
        for column, value in ((c.tenant, flt.tenant), (c.sandbox_id, flt.sandbox_id), (c.user_id, flt.user_id)):
            if value is not None:
                q = q.where(column == value)
        if flt.type:
            q = q.where(sa.or_(c.type == flt.type, c.type.startswith(flt.type + ".", autoescape=True)))
        if flt.since is not None:
            q = q.where(c.time >= flt.since)
        if flt.until is not None:
            q = q.where(c.time < flt.until)
        if flt.after_id is not None:
            q = q.where(c.id > flt.after_id)
        with self.engine.connect() as conn:
            return [AuditEvent(r.type, r.data, r.sandbox_id, r.tenant, r.user_id, r.time, r.id)
                    for r in conn.execute(q)]

    def prune(self, before: float) -> int:
        with self.engine.begin() as conn:
            return conn.execute(events.delete().where(events.c.time < before)).rowcount or 0


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "...[cut]"
    if isinstance(value, bytes):
        return _bounded(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {str(k): _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    with contextlib.suppress(Exception):
        return str(value)
    return None
