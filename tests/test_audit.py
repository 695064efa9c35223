"""The audit store on SQLite and on a real PostgreSQL server (STOCKADE_TEST_POSTGRES_URL; CI starts one)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from stockade.audit import AuditEvent, Redactor, SQLAudit
from stockade.audit.events import REDACTED, EventFilter
from stockade.audit.store import RETRY, SCHEMA_VERSION, SQLiteAudit, open_store
from stockade.db import MIGRATIONS, engine_for, migrate

from .db_support import pg_schema_url
from .waiting import wait_until


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        yield from pg_schema_url()


@pytest.fixture(params=["sqlite", "postgresql", "sqlite-stdlib"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLAudit]:
    """SQLAudit over each database, and SQLiteAudit (the stdlib writer, SQLite files only)."""
    if request.param == "postgresql":
        urls = pg_schema_url()
        url = next(urls)
    else:
        urls, url = iter(()), f"sqlite:///{tmp_path / 'audit.db'}"
    try:
        if request.param == "sqlite-stdlib":
            engine_for(url, tmp_path).dispose()  # the schema, as the first process on a host makes it
            audit = open_store(url, tmp_path)
            assert isinstance(audit, SQLiteAudit)
        else:
            audit = SQLAudit(engine_for(url, tmp_path))
        yield audit
        audit.close()
    finally:
        for _ in urls:  # drops the PostgreSQL schema
            pass


def test_events_round_trip_with_every_filter(store: SQLAudit) -> None:
    t0 = 1_700_000_000.0
    store.record(AuditEvent("sandbox.create", {"policy": {"a": 1}}, "sbx-1", "acme", "u1", t0))
    store.record(AuditEvent("command.start", {"argv": ["ls", "-l"]}, "sbx-1", "acme", "u1", t0 + 1))
    store.record(AuditEvent("command.end", {"exit_code": 0, "stdout": "é\n"}, "sbx-1", "acme", "u1", t0 + 2))
    store.record(AuditEvent("commandeer", {}, "sbx-2", "other", "u2", t0 + 3))  # not in the command family
    store.record(AuditEvent("api.request", {"route": "/sandboxes"}, None, "acme", None, t0 + 4))
    store.flush()
    every = store.query(EventFilter())
    assert [e.type for e in every] == ["sandbox.create", "command.start", "command.end", "commandeer", "api.request"]
    assert every[2].data == {"exit_code": 0, "stdout": "é\n"} and every[2].time == t0 + 2
    assert all(isinstance(e.id, int) for e in every) and [e.id for e in every] == sorted(e.id for e in every)
    q = store.query
    assert [e.type for e in q(EventFilter(type="command"))] == ["command.start", "command.end"]
    assert [e.type for e in q(EventFilter(tenant="other"))] == ["commandeer"]
    assert [e.type for e in q(EventFilter(user_id="u1", since=t0 + 1, until=t0 + 2))] == ["command.start"]
    assert len(q(EventFilter(sandbox_id="sbx-1"))) == 3
    assert [e.type for e in q(EventFilter(after_id=every[3].id))] == ["api.request"]
    assert len(q(EventFilter(limit=2))) == 2
    assert q(EventFilter(type="%")) == []  # a LIKE wildcard in the filter is a literal character


def test_events_survive_a_reopen_and_prune_by_age(db_url: str, tmp_path: Path) -> None:
    first = SQLAudit(engine_for(db_url, tmp_path))
    first.record(AuditEvent("old", {}, "sbx-1", time=100.0))
    first.record(AuditEvent("new", {}, "sbx-1", time=200.0))
    first.close()
    second = SQLAudit(engine_for(db_url, tmp_path))
    try:
        assert [e.type for e in second.query(EventFilter(sandbox_id="sbx-1"))] == ["old", "new"]
        assert second.prune(150.0) == 1
        assert [e.type for e in second.query(EventFilter())] == ["new"]
    finally:
        second.close()


def test_migrations_run_once_also_when_processes_race(db_url: str, tmp_path: Path) -> None:
    engine = engine_for(db_url, tmp_path)
    errors: list[BaseException] = []

    def again() -> None:
        try:
            migrate(engine)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=again) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM stockade_schema")).scalars().all() == [len(MIGRATIONS)]
    engine.dispose()


def test_huge_values_are_bounded_and_bytes_become_text(store: SQLAudit) -> None:
    store.record(AuditEvent("command.end", {"stdout": "x" * (3 << 20), "raw": b"\xff\xfe", "n": [1, None]}))
    store.flush()
    (event,) = store.query(EventFilter())
    assert len(event.data["stdout"]) < (1 << 20) + 100 and event.data["stdout"].endswith("[cut]")
    assert event.data["raw"] == "\ufffd\ufffd" and event.data["n"] == [1, None]


def test_redactor_replaces_every_occurrence_at_any_depth() -> None:
    redact = Redactor([b"s3cr3t-value", "s3cr3t"])
    out = redact({"stdout": "a s3cr3t-value b", "argv": ["--key=s3cr3t"], "n": 3, "s3cr3t": "k"})
    assert out == {"stdout": f"a {REDACTED} b", "argv": [f"--key={REDACTED}"], "n": 3, REDACTED: "k"}
    assert Redactor()({"a": "b"}) == {"a": "b"}


def test_a_size_cap_prunes_the_oldest_events_first(store: SQLAudit) -> None:
    for i in range(3000):
        store.record(AuditEvent("command.end", {"stdout": f"{i:06d}" + "x" * 1000}, "sbx-cap", "acme"))
    store.flush()
    before = store.size()
    assert before > 2_000_000
    removed = store.prune_to_size(1 << 20)
    assert removed > 0 and store.size() <= 1 << 20
    left = store.query(EventFilter(sandbox_id="sbx-cap", limit=10_000))
    assert len(left) == 3000 - removed
    assert [e.data["stdout"][:6] for e in left] == [f"{i:06d}" for i in range(removed, 3000)]  # the newest stay
    assert store.prune_to_size(1 << 30) == 0


# ---- the stdlib writer (SQLiteAudit) ------------------------------------------------------------------
def test_the_stdlib_writer_targets_the_newest_schema() -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION


def test_open_store_uses_the_stdlib_writer_only_on_a_current_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first = open_store(url, tmp_path)  # no file yet: sqlalchemy creates the schema
    assert type(first) is SQLAudit
    first.close()
    second = open_store(url, tmp_path)
    assert type(second) is SQLiteAudit
    second.close()
    default = open_store(None, tmp_path / "data")  # None: stockade.db in the data directory
    assert type(default) is SQLAudit and (tmp_path / "data" / "stockade.db").is_file()
    default.close()
    assert type(again := open_store(None, tmp_path / "data")) is SQLiteAudit
    again.close()
    with sa.create_engine(url).begin() as conn:  # an older (or newer) schema: sqlalchemy migrates or refuses
        conn.execute(sa.text("UPDATE stockade_schema SET version = 0"))
    older = open_store(url, tmp_path)
    assert type(older) is SQLAudit
    older.close()
    with_options = open_store(url + "?timeout=5", tmp_path)
    assert type(with_options) is SQLAudit
    with_options.close()


def test_the_stdlib_writer_and_sqlalchemy_read_each_others_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    sql = SQLAudit(engine_for(url, tmp_path))
    sql.record(AuditEvent("one", {"nested": {"x": [1, 2.5, None, "é"]}, "b": b"\xff"}, "sbx-1", "t", "u", 10.0))
    sql.close()
    fast = open_store(url, tmp_path)
    assert isinstance(fast, SQLiteAudit)
    fast.record(AuditEvent("two", {"nested": {"x": [1, 2.5, None, "é"]}, "b": b"\xff"}, "sbx-1", "t", "u", 11.0))
    fast.flush()
    one, two = fast.query(EventFilter(sandbox_id="sbx-1"))
    assert (one.type, two.type) == ("one", "two") and one.data == two.data
    assert (two.tenant, two.user_id, two.time) == ("t", "u", 11.0) and two.id == one.id + 1
    assert fast.prune(10.5) == 1
    fast.close()
    reader = SQLAudit(engine_for(url, tmp_path))
    try:
        assert [e.type for e in reader.query(EventFilter())] == ["two"]
    finally:
        reader.close()


def test_the_stdlib_writer_holds_events_while_the_database_fails_and_writes_them_after(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    engine = engine_for(url, tmp_path)
    fast = open_store(url, tmp_path)
    assert isinstance(fast, SQLiteAudit)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE audit_events RENAME TO audit_events_away"))
        fast.record(AuditEvent("held", {"n": 1}, "sbx-1"))
        fast.flush()
        assert (fast.state, fast.held) == ("failing", 1) and "audit_events" in (fast.error or "")
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE audit_events_away RENAME TO audit_events"))
        wait_until(lambda: fast.state == "ok", RETRY * 10, "the held event written once the table is back")
        assert fast.held == 0 and [e.type for e in fast.query(EventFilter())] == ["held"]
    finally:
        fast.close()
        engine.dispose()
