"""The one-shot CLI's fast path: lazy imports, the on-disk seccomp cache, audit pruning at most once an
interval; none of them loosens a control or loses an audit event."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade.audit import retention
from stockade.runtime.jail import seccomp, seccomp_cache

from .conftest import ROOT

NOBODY = 65534
HEAVY = ("fastapi", "uvicorn", "sqlalchemy", "cryptography", "mcp", "stockade.templates.store",
         "stockade.templates.oci", "stockade.server", "stockade.broker.secrets")


def loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


# ---- lazy imports -----------------------------------------------------------------------------------
def test_the_public_api_imports_nothing_heavy_until_used():
    mods = loaded_after("from stockade import Sandbox, AsyncSandbox, Policy, StockadeError")
    assert {"stockade.sdk.sandbox", "stockade.policy"} <= mods
    assert mods.isdisjoint(HEAVY), sorted(mods & set(HEAVY))
    assert "stockade.sdk.sandbox" not in loaded_after("import stockade")


def test_the_lazy_names_are_the_real_ones():
    import stockade
    import stockade.audit
    import stockade.templates
    from stockade.audit.store import SQLAudit
    from stockade.sdk.sandbox import Sandbox
    from stockade.templates.store import TemplateStore

    assert stockade.Sandbox is Sandbox and stockade.audit.SQLAudit is SQLAudit
    assert stockade.templates.TemplateStore is TemplateStore
    assert set(stockade.__all__) <= set(dir(stockade))
    with pytest.raises(AttributeError, match="no_such_name"):
        stockade.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="nope"):
        stockade.templates.nope  # noqa: B018


def test_the_command_line_parses_without_the_server_mcp_or_templates():
    mods = loaded_after("import stockade.cli")
    assert mods.isdisjoint(HEAVY), sorted(mods & set(HEAVY))


def test_a_run_without_network_or_secrets_imports_no_sqlalchemy_broker_server_or_mcp(tmp_path, weak_policy_args):
    code = ("import sys\nfrom stockade.cli import app\n"
            f"sys.argv = ['stockade', 'run', *{weak_policy_args!r}, '--', 'true']\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n")
    from stockade.db import engine_for

    url = f"sqlite:///{tmp_path}/audit.db"
    engine_for(url, tmp_path).dispose()  # the database exists, as after the host's first run
    mods = loaded_after(code, {"STOCKADE_DATABASE_URL": url})
    assert "stockade.core.manager" in mods  # it did run a sandbox
    assert mods.isdisjoint({"fastapi", "uvicorn", "cryptography", "mcp", "stockade.server", "sqlalchemy",
                            "stockade.broker.secrets", "stockade.broker.proxy", "h11",
                            "stockade.templates.oci"}), mods


@pytest.fixture
def weak_policy_args(tmp_path: Path) -> list[str]:
    if ROOT:
        return []
    p = tmp_path / "policy.toml"
    p.write_text('allow_missing_controls = ["memory", "pids", "cpu"]\n')
    return ["--policy", str(p)]


def test_a_one_shot_run_still_commits_its_audit_events(tmp_path, weak_policy_args):
    env = {**os.environ, "STOCKADE_DATABASE_URL": f"sqlite:///{tmp_path}/audit.db"}
    cli = [sys.executable, "-m", "stockade.cli"]
    # the first run makes the database (SQLAudit), the second writes through SQLiteAudit; both exit fast
    for word in ("first", "second"):
        r = subprocess.run([*cli, "run", *weak_policy_args, "--", "echo", word], capture_output=True, text=True,
                           env=env, timeout=120)
        assert (r.returncode, r.stdout) == (0, f"{word}\n"), r.stderr
    with sqlite3.connect(tmp_path / "audit.db") as db:
        sids = [sid for (sid,) in db.execute("SELECT sandbox_id FROM audit_events WHERE type = 'command.start' "
                                             "ORDER BY id")]
    assert len(sids) == 2
    for sid, word in zip(sids, ("first", "second"), strict=True):
        logs = subprocess.run([*cli, "logs", sid], capture_output=True, text=True, env=env, timeout=120)
        assert logs.returncode == 0, logs.stderr
        assert "command.start" in logs.stdout and f"$ echo {word}" in logs.stdout
        assert "command.end" in logs.stdout and "exit 0" in logs.stdout and f"stdout: {word}" in logs.stdout
        assert "sandbox.end" in logs.stdout


def test_serve_mcp_and_template_commands_still_load():
    for args in (["serve", "--help"], ["mcp", "--help"], ["template", "list", "--help"], ["keys", "--help"]):
        r = subprocess.run([sys.executable, "-m", "stockade.cli", *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, (args, r.stderr)


# ---- the seccomp cache ------------------------------------------------------------------------------
@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state / "seccomp"


def key() -> str:
    return seccomp_cache.cache_key(Path(seccomp.__file__))


def entry(cache_dir: Path) -> Path:
    return cache_dir / f"{key()}.bpf"


def test_the_cache_holds_exactly_the_compiled_program(cache_dir):
    program = seccomp.compile_bpf()
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program
    assert oct(entry(cache_dir).stat().st_mode & 0o777) == "0o600"
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700"
    compiled = []
    again = seccomp_cache.cached(lambda: compiled.append(1) or program, Path(seccomp.__file__), cache_dir)
    assert again == program and compiled == []  # served from the cache


def test_no_state_directory_means_no_cache_and_none_made(tmp_path):
    missing = tmp_path / "state" / "seccomp"  # the runtime makes the state directory, with its own mode
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), missing) == seccomp.compile_bpf()
    assert not (tmp_path / "state").exists()


def test_the_key_follows_the_rule_table(tmp_path):
    rules = tmp_path / "seccomp.py"
    rules.write_bytes(Path(seccomp.__file__).read_bytes())
    before = seccomp_cache.cache_key(rules)
    rules.write_bytes(rules.read_bytes().replace(b'"ptrace",', b""))
    assert seccomp_cache.cache_key(rules) != before
    assert seccomp_cache.cache_key(Path(seccomp.__file__)) == key()


def poison(path: Path) -> None:
    """A well-formed entry (right magic and checksum) holding an allow-everything program."""
    import hashlib
    allow_all = (0x06).to_bytes(2, "little") + b"\0\0" + (0x7FFF0000).to_bytes(4, "little")  # RET ALLOW
    path.write_bytes(seccomp_cache.MAGIC + hashlib.sha256(allow_all).digest() + allow_all)
    path.chmod(0o600)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty", "odd"])
def test_a_damaged_entry_is_ignored_and_replaced(cache_dir, damage):
    program = seccomp.compile_bpf()
    seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir)
    path = entry(cache_dir)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[:-8]
    elif damage == "magic":
        data[0:4] = b"evil"
    elif damage == "empty":
        data = bytearray()
    else:
        data = data[:-1]
    path.write_bytes(bytes(data))
    assert seccomp_cache.load(cache_dir, key()) is None
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program
    assert seccomp_cache.load(cache_dir, key()) == program  # rewritten


def test_a_loose_mode_or_a_symlink_is_not_trusted(cache_dir, tmp_path):
    program = seccomp.compile_bpf()
    cache_dir.mkdir(mode=0o700)
    path = entry(cache_dir)
    poison(path)
    path.chmod(0o620)  # writable by the group: anyone in it could have planted it
    assert seccomp_cache.load(cache_dir, key()) is None
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program
    elsewhere = tmp_path / "planted.bpf"
    poison(elsewhere)
    path.unlink()
    path.symlink_to(elsewhere)
    assert seccomp_cache.load(cache_dir, key()) is None
    cache_dir.chmod(0o777)  # a directory others can write into: nothing in it is trusted
    path.unlink()
    poison(path)
    planted = path.read_bytes()
    assert seccomp_cache.load(cache_dir, key()) is None
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program
    assert path.read_bytes() == planted  # and nothing is written there either
    cache_dir.chmod(0o700)


@pytest.mark.skipif(not ROOT, reason="needs root to make files owned by another user")
def test_a_foreign_owned_entry_or_directory_is_not_used(cache_dir):
    program = seccomp.compile_bpf()
    cache_dir.mkdir(mode=0o700)
    path = entry(cache_dir)
    poison(path)
    os.chown(path, NOBODY, NOBODY)
    assert seccomp_cache.load(cache_dir, key()) is None
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program
    path.unlink(missing_ok=True)
    poison(path)
    os.chown(cache_dir, NOBODY, NOBODY)
    assert seccomp_cache.load(cache_dir, key()) is None
    assert seccomp_cache.cached(seccomp.compile_bpf, Path(seccomp.__file__), cache_dir) == program


def test_filter_bpf_uses_the_state_directory_and_refuses_a_planted_program(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(state))
    program = seccomp.compile_bpf()
    seccomp.filter_bpf.cache_clear()
    try:
        assert seccomp.filter_bpf() == program
        path = state / "seccomp" / f"{key()}.bpf"
        assert seccomp_cache.load(state / "seccomp", key()) == program
        poison(path)
        path.chmod(0o640 | 0o002)
        seccomp.filter_bpf.cache_clear()
        assert seccomp.filter_bpf() == program
    finally:
        seccomp.filter_bpf.cache_clear()


# ---- audit pruning ----------------------------------------------------------------------------------
class Counting:
    def __init__(self) -> None:
        self.cuts: list[float] = []

    def prune(self, before: float) -> int:
        self.cuts.append(before)
        return 0


def test_prune_runs_once_per_interval_and_never_keeps_an_event_past_retention_plus_interval(tmp_path):
    audit, day, now = Counting(), 86400.0, 1_800_000_000.0
    assert retention.prune_if_due(audit, tmp_path, "", day, now) == 0
    assert retention.prune_if_due(audit, tmp_path, "", day, now + 60) is None
    assert retention.prune_if_due(audit, tmp_path, "", day, now + retention.INTERVAL - 1) is None
    assert retention.prune_if_due(audit, tmp_path, "", day, now + retention.INTERVAL) == 0
    assert audit.cuts == [now - day, now + retention.INTERVAL - day]
    stamp = retention.stamp_path(tmp_path, "")
    assert oct(stamp.stat().st_mode & 0o777) == "0o600"
    # a shorter retention moves the cut-off past the last one by more than the interval: prune now
    assert retention.prune_if_due(audit, tmp_path, "", 60.0, now + retention.INTERVAL + 1) == 0
    # another database has its own stamp
    assert retention.prune_if_due(audit, tmp_path, "sqlite:////elsewhere.db", day, now + 2) == 0
    assert len(audit.cuts) == 4


@pytest.mark.parametrize("bad", ["garbage", "nan", "inf", "loose", "symlink"])
def test_a_stamp_we_cannot_trust_means_prune(tmp_path, bad):
    audit, day, now = Counting(), 86400.0, 1_800_000_000.0
    stamp = retention.stamp_path(tmp_path, "")
    if bad == "symlink":
        target = tmp_path / "target"
        target.write_text(repr(now - day))
        stamp.symlink_to(target)
    else:
        stamp.write_text({"garbage": "yesterday", "nan": "nan", "inf": "inf"}.get(bad, repr(now - day)))
        stamp.chmod(0o666 if bad == "loose" else 0o600)
    assert retention.prune_if_due(audit, tmp_path, "", day, now) == 0
    assert audit.cuts == [now - day]


@pytest.mark.skipif(not ROOT, reason="needs root to make a file owned by another user")
def test_a_foreign_owned_stamp_means_prune(tmp_path):
    audit, day, now = Counting(), 86400.0, 1_800_000_000.0
    stamp = retention.stamp_path(tmp_path, "")
    stamp.write_text(repr(now - day))
    stamp.chmod(0o600)
    os.chown(stamp, NOBODY, NOBODY)
    assert retention.prune_if_due(audit, tmp_path, "", day, now) == 0


def test_open_audit_prunes_old_events_of_the_real_store(tmp_path):
    from stockade.audit import AuditEvent
    from stockade.audit.events import EventFilter
    from stockade.config import HostConfig
    from stockade.core.build import open_audit

    config = HostConfig(state_dir=tmp_path / "state", data_dir=tmp_path / "data", sandbox_env=tmp_path / "env",
                        host_groups={}, audit_retention=3600.0)
    audit = open_audit(config)
    audit.record(AuditEvent("test.old", {}, "sbx-old", time=time.time() - 7200))
    audit.record(AuditEvent("test.new", {}, "sbx-new"))
    audit.close()
    retention.stamp_path(config.data_dir, "").unlink()  # as if the last prune was long ago
    audit = open_audit(config)
    try:
        kinds = [e.type for e in audit.query(EventFilter())]
    finally:
        audit.close()
    assert kinds == ["test.new"]
