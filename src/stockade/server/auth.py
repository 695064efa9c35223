"""API keys and the per-key rate limit.

A key is ``sk_<id>_<secret>``: the id is public (it appears in logs and `keys list`); only the sha256 of
the secret is stored, compared in constant time. Secrets are 256 random bits, so a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..db import api_keys

KEY_RE = re.compile(r"^sk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CACHE_SECONDS = 2.0  # how long a verified key is trusted before the database is asked again (revocation delay)


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, tuple[float, str, Principal]] = {}   # key id -> when, secret hash, principal

    def create(self, tenant: str, name: str = "") -> tuple[str, str]:
        """Returns (key id, the full key). The full key is shown once and never stored."""
        if not TENANT_RE.match(tenant):
            raise ValueError("a tenant name is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(id=key_id, tenant=tenant, secret_hash=_hash(secret),
                                                  created=time.time(), name=name[:256]))
        return key_id, f"sk_{key_id}_{secret}"

    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.created,
                      api_keys.c.revoked).order_by(api_keys.c.created)
        if tenant is not None:
            q = q.where(api_keys.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def revoke(self, key_id: str) -> bool:
        with self.engine.begin() as conn:
            n = conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked.is_(None))
                             .values(revoked=time.time())).rowcount
        self._cache.pop(key_id, None)
        return bool(n)

    def cached(self, key: str) -> Principal | None:
        """The key's principal if it was verified in the last CACHE_SECONDS (no database access)."""
        parsed = _parse(key)
        if parsed is None:
            return None
        key_id, digest = parsed
        cached = self._cache.get(key_id)
        fresh = cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS
        if cached is not None and fresh and hmac.compare_digest(cached[1], digest):
            return cached[2]
        return None

    def authenticate(self, key: str) -> Principal | None:
        parsed = _parse(key)
        if parsed is None:
            return None
        key_id, digest = parsed
        now = time.monotonic()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys.c.tenant, api_keys.c.secret_hash)
                               .where(api_keys.c.id == key_id, api_keys.c.revoked.is_(None))).first()
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            self._cache.pop(key_id, None)
            return None
        principal = Principal(key_id, row.tenant)
        self._cache[key_id] = (now, digest, principal)
        return principal


def _parse(key: str) -> tuple[str, str] | None:
    """(key id, sha256 of the secret) of a well-formed key."""
    m = KEY_RE.match(key)
    return (m.group(1), _hash(m.group(2))) if m else None


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second sustained, ``burst`` at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}   # key id -> tokens, last refill

    def allow(self, key_id: str, rate: float, burst: int) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / rate
        self._buckets[key_id] = (tokens - 1, now)
        return 0.0
