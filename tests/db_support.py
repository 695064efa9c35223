"""A PostgreSQL schema of its own for a test (shared by the audit store's and the server process's tests)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from stockade.db import engine_for

PG_URL = os.environ.get("STOCKADE_TEST_POSTGRES_URL")


def pg_schema_url() -> Iterator[str]:
    """A schema of its own on the test server, dropped afterwards."""
    if not PG_URL:
        pytest.skip("STOCKADE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    schema = "t_" + secrets.token_hex(6)
    admin = engine_for(PG_URL, Path("/nonexistent"))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
