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
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .events import Audit, AuditEvent, EventFilter

if TYPE_CHECKING:  # sqlalchemy is imported by the methods that use it: SQLiteAudit writes without it
    from sqlalchemy.engine import Engine

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


SCHEMA_VERSION = 1  # len(db.MIGRATIONS): the schema SQLiteAudit writes to without migrating (a test checks)


class SQLAudit(Audit):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._start()

    def _start(self) -> None:
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
        self._dispose()

    def _dispose(self) -> None:
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

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` in one transaction; raises what ``_write_errors`` names on failure."""
        from ..db import events

        with self.engine.begin() as conn:
            conn.execute(events.insert(), rows)

    def _write_errors(self) -> tuple[type[Exception], ...]:
        import sqlalchemy as sa

        return (sa.exc.SQLAlchemyError,)

    @staticmethod
    def _describe(exc: Exception) -> str:
        orig = getattr(exc, "orig", None)  # a DBAPIError's driver error says more
        return str(orig if isinstance(orig, Exception) else exc)[:500]

    def _insert(self, batch: list[AuditEvent]) -> bool:
        rows = [{"time": e.time, "type": e.type[:64], "tenant": e.tenant, "sandbox_id": e.sandbox_id,
                 "user_id": e.user_id, "data": _bounded(e.data)} for e in batch]
        attempts = 1 if self.state != "ok" else 3  # a locked SQLite file or a database restart: retry briefly
        errors = self._write_errors()
        for attempt in range(attempts):
            try:
                self._write_rows(rows)
                self.written += len(rows)
                return True
            except errors as exc:
                self.failures += 1
                self._error = self._describe(exc)
                if attempt + 1 < attempts:
                    time.sleep(0.05 * 4 ** attempt)
        if self.state == "ok":
            log.critical("audit store cannot be written (%s): %d events held in memory, new work refused until "
                         "it can", self.error, len(self._held))
        self._state = "failing"
        return False

    def query(self, flt: EventFilter) -> list[AuditEvent]:
        import sqlalchemy as sa

        from ..db import events

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
        from ..db import events

        with self.engine.begin() as conn:
            return conn.execute(events.delete().where(events.c.time < before)).rowcount or 0

    def size(self) -> int:
        """Bytes the audit log takes in the database (SQLite: the whole file's used pages; PostgreSQL: the
        live rows)."""
        import sqlalchemy as sa

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
        import sqlalchemy as sa

        from ..db import events

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


class SQLiteAudit(SQLAudit):
    """The same store over the standard library's sqlite3, for a SQLite database whose schema is current:
    what a one-shot process (`stockade run`, the SDK's local mode) needs, without importing sqlalchemy
    (~100 ms). Writes (the same writer thread, batches, held events and retries) and pruning go through one
    sqlite3 connection, with the pragmas ``db.engine_for`` sets; queries and the size cap open the
    sqlalchemy engine on first use. ``open_store`` picks it; anything else (a new or older database,
    PostgreSQL, a URL with options) gets ``SQLAudit`` over ``engine_for``, which migrates."""

    INSERT = ("INSERT INTO audit_events (time, type, tenant, sandbox_id, user_id, data) "
              "VALUES (:time, :type, :tenant, :sandbox_id, :user_id, :data)")

    def __init__(self, path: Path, url: str | None, data_dir: Path) -> None:
        self.path, self._url, self._data_dir = path, url, data_dir
        self._engine: Engine | None = None
        self._lock = threading.Lock()   # the writer thread and prune() share the connection
        self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._start()

    @staticmethod
    def schema_current(path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
                rows = conn.execute("SELECT version FROM stockade_schema").fetchall()
        except sqlite3.Error:
            return False
        return rows == [(SCHEMA_VERSION,)]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from ..db import engine_for

            self._engine = engine_for(self._url, self._data_dir)
        return self._engine

    @engine.setter
    def engine(self, value: Engine) -> None:
        self._engine = value

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            try:
                self._conn.executemany(self.INSERT, [{**r, "data": json.dumps(r["data"])} for r in rows])
                self._conn.commit()
            except sqlite3.Error:
                self._conn.rollback()
                raise

    def _write_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.Error,)

    def prune(self, before: float) -> int:
        with self._lock:
            try:
                removed = self._conn.execute("DELETE FROM audit_events WHERE time < ?", (before,)).rowcount
                self._conn.commit()
            except sqlite3.Error:
                self._conn.rollback()
                raise
        return max(removed, 0)

    def _dispose(self) -> None:
        with self._lock:
            self._conn.close()
        if self._engine is not None:
            self._engine.dispose()


def open_store(url: str | None, data_dir: Path) -> SQLAudit:
    """The audit store at ``url`` (None: SQLite in ``data_dir``, as ``db.engine_for``): SQLiteAudit when it
    is a plain SQLite file already at the current schema, else SQLAudit (which creates or migrates it)."""
    path: Path | None = None
    if not url:
        path = data_dir / "stockade.db"
    elif url.startswith("sqlite:///") and "?" not in url and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):])
    if path is not None and SQLiteAudit.schema_current(path):
        return SQLiteAudit(path, url, data_dir)
    from ..db import engine_for

    return SQLAudit(engine_for(url, data_dir))


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
