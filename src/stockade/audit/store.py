"""The durable store: a table in the host's database (SQLite WAL or PostgreSQL), written by one thread.

Callers queue events (a lock-free SimpleQueue); a writer thread inserts whatever is queued in one
transaction (group commit: while one commit runs, the next batch gathers). ``commit()`` is awaited by the
server before it answers a request, so a result a client has seen is in the store: a crash of the server
process (SIGKILL) loses no record of an answered request. (SQLite runs with synchronous=NORMAL: a power
loss may lose the last commits; PostgreSQL's commit is durable as it is configured.)

When a write fails (a full disk, the database down), nothing is dropped: the failed batch and everything
queued after it are held in memory and retried every RETRY seconds, in order; ``state`` says "failing"
with the reason, and the server refuses new work (503) until a write succeeds again. Only a crash while
failing loses the held events. A backlog beyond BACKLOG events makes callers wait (back-pressure).
"""

from __future__ import annotations

import asyncio
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
RETRY = 1.0               # seconds between attempts while the store is failing
MAX_STRING = 1 << 20      # no single value in an event may exceed this (output has its own, lower cap)
log = logging.getLogger("stockade.audit")


class _Flush:
    """A marker: set once every event queued before it is committed, or the store is failing."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.done = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[bool] | None = loop.create_future() if loop is not None else None
        self.ok = False

    def set(self, ok: bool) -> None:
        self.ok = ok
        self.done.set()
        if self.loop is not None and self.future is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.loop.call_soon_threadsafe(self._resolve, ok)

    def _resolve(self, ok: bool) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(ok)


class SQLAudit(Audit):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.written = 0
        self.failures = 0          # failed write attempts
        self._state = "ok"          # "failing" while writes fail; new work is refused meanwhile
        self._error: str | None = None
        self._held: list[AuditEvent] = []  # written nowhere yet: a failed batch and what queued behind it
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

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def held(self) -> int:
        return len(self._held)

    def flush(self) -> None:
        """Wait until every event recorded so far is in the store, or the store reports failing."""
        if self._closed:
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()

    async def commit(self) -> bool:
        """Wait (without blocking the loop) until the events recorded so far are committed: True, or
        False when the store is failing (they are held and retried)."""
        if self._closed:
            return self.state == "ok"
        marker = _Flush(asyncio.get_running_loop())
        self._queue.put(marker)
        assert marker.future is not None
        return await marker.future

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self._held:
            log.critical("audit store unavailable at shutdown: %d events could not be written: %s",
                         len(self._held), self.error)
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self.engine.dispose()

    def _writer(self) -> None:
        while True:
            try:  # while failing, wake every RETRY seconds to try the held events again
                item: AuditEvent | _Flush | None = self._queue.get(timeout=RETRY if self._held else None)
            except queue.Empty:
                self._write_held()
                continue
            markers: list[_Flush] = []
            stop = False
            taken = 0
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    self._held.append(item)
                    taken += 1
                if taken >= BATCH or stop:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            ok = self._write_held()
            for m in markers:
                m.set(ok)
            if stop:
                return

    def _write_held(self) -> bool:
        """Insert the held events in order, in batches; False (and they stay held) when the store fails."""
        while self._held:
            batch = self._held[:BATCH]
            if not self._insert(batch):
                return False
            del self._held[:len(batch)]
        if self.state != "ok":
            log.warning("audit store writable again: the held events are written")
            self._state, self._error = "ok", None
        return True

    def _insert(self, batch: list[AuditEvent]) -> bool:
        rows = [{"time": e.time, "type": e.type[:64], "tenant": e.tenant, "sandbox_id": e.sandbox_id,
                 "user_id": e.user_id, "data": _bounded(e.data)} for e in batch]
        attempts = 1 if self.state != "ok" else 3  # a locked SQLite file or a database restart: retry briefly
        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    conn.execute(events.insert(), rows)
                self.written += len(rows)
                return True
            except sa.exc.SQLAlchemyError as exc:
                self.failures += 1
                self._error = str(exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc)[:500]
                if attempt + 1 < attempts:
                    time.sleep(0.05 * 4 ** attempt)
        if self.state == "ok":
            log.critical("audit store cannot be written (%s): %d events held in memory, new work refused until "
                         "it can", self.error, len(self._held))
        self._state = "failing"
        return False

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
        if flt.exclude_type is not None:
            q = q.where(c.type != flt.exclude_type)
        with self.engine.connect() as conn:
            return [AuditEvent(r.type, r.data, r.sandbox_id, r.tenant, r.user_id, r.time, r.id)
                    for r in conn.execute(q)]

    def prune(self, before: float) -> int:
        with self.engine.begin() as conn:
            return conn.execute(events.delete().where(events.c.time < before)).rowcount or 0

    def size(self) -> int:
        """Bytes the audit log takes in the database (SQLite: the whole file's used pages; PostgreSQL: the
        live rows)."""
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                pages = conn.execute(sa.text("PRAGMA page_count")).scalar() or 0
                free = conn.execute(sa.text("PRAGMA freelist_count")).scalar() or 0
                page = conn.execute(sa.text("PRAGMA page_size")).scalar() or 4096
                return int((pages - free) * page)
            # the live rows' bytes: the table's files keep dead rows' space after a DELETE until a VACUUM
            # (and never give it back without VACUUM FULL), so their size cannot tell a cap was reached
            return int(conn.execute(sa.text("SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM audit_events e"))
                       .scalar() or 0)

    def prune_to_size(self, max_bytes: int) -> int:
        """Delete the oldest events until the log takes at most ``max_bytes``; returns how many. (Freed space
        is reused by new events; SQLite's file does not shrink.)"""
        removed = 0
        for _ in range(64):
            used = self.size()
            if used <= max_bytes:
                break
            with self.engine.begin() as conn:
                rows = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar() or 0
                if not rows:
                    break
                # the oldest share that is over the cap, and a tenth more so the next events fit
                n = max(1, int(rows * (1 - max_bytes / used) + rows / 10))
                cut = conn.execute(sa.select(events.c.id).order_by(events.c.id).offset(min(n, rows) - 1)
                                   .limit(1)).scalar()
                removed += conn.execute(events.delete().where(events.c.id <= cut)).rowcount or 0
        return removed


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
