"""The host's database: the audit log, API keys and the server's sandbox registry.

SQLite (WAL) in the data directory by default, PostgreSQL when given a URL. Plain SQLAlchemy Core; the
schema is versioned and each migration runs once, in order, inside one transaction per step.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

events = sa.Table(
    "audit_events", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128)),
    sa.Column("sandbox_id", sa.String(64)),
    sa.Column("user_id", sa.String(256)),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Index("audit_events_sandbox", "sandbox_id", "id"),
    sa.Index("audit_events_tenant_time", "tenant", "time"),
    sa.Index("audit_events_time", "time"),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(32), primary_key=True),          # public part of the key
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),   # sha256 of the secret part
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float),
    sa.Column("name", sa.String(256), nullable=False, server_default=""),
)

sandboxes = sa.Table(
    "sandboxes", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("user_id", sa.String(256)),
    sa.Column("run_id", sa.String(64), nullable=False),        # the server run that owns it
    sa.Column("state", sa.String(16), nullable=False),         # running | ended
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
    sa.Column("end_reason", sa.String(512)),
    sa.Column("memory", sa.BigInteger, nullable=False),
    sa.Column("cpus", sa.Float, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Index("sandboxes_tenant_state", "tenant", "state"),
)

schema_version = sa.Table("stockade_schema", metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1(conn: Connection) -> None:
    for table in (events, api_keys, sandboxes):
        table.create(conn, checkfirst=True)


# Append only: a released migration never changes; a new schema is a new step.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1]


def engine_for(url: str | None, data_dir: Path) -> Engine:
    """``url`` None means SQLite in the data directory."""
    if not url:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        url = f"sqlite:///{data_dir / 'stockade.db'}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_size=5, max_overflow=5, pool_pre_ping=True)
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")      # readers never wait for the writer
            cur.execute("PRAGMA synchronous=NORMAL")    # durable at each checkpoint; WAL keeps it consistent
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    migrate(engine)
    return engine


def migrate(engine: Engine) -> int:
    """Bring the schema to the newest version; returns it. Safe to run from several processes at once:
    PostgreSQL takes an advisory lock, SQLite a file lock beside the database."""
    with _migration_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242424242)"))
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(sa.select(schema_version.c.version)).scalar()
        if current is None:
            current = 0
            conn.execute(schema_version.insert().values(version=0))
        for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
            step(conn)
            conn.execute(schema_version.update().values(version=version))
    return len(MIGRATIONS)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
