"""Shared fixtures. Every sandbox a test makes is killed by a finalizer, also when the test fails, and
the session ends by checking that no sandbox process, cgroup or lock file is left on the host."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade import Policy, Sandbox
from stockade.config import HostConfig
from stockade.sdk.transports.base import Transport

ROOT = os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    """The tests' audit events go to a database of their own, removed with the session. (A hook, not
    module code: helper processes that import this file must not make directories of their own.)"""
    audit_dir = tempfile.mkdtemp(prefix="stockade-test-audit-")
    config.stash[AUDIT_DIR] = audit_dir
    os.environ["STOCKADE_DATABASE_URL"] = f"sqlite:///{audit_dir}/audit.db"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash.get(AUDIT_DIR, ""), ignore_errors=True)


AUDIT_DIR = pytest.StashKey[str]()
UNPRIVILEGED_GAPS = ["memory", "pids", "cpu"]


def base_policy(**sections: dict[str, Any]) -> Policy:
    """The default policy, plus: an unprivileged run accepts missing cgroup controls."""
    data: dict[str, Any] = {} if ROOT else {"allow_missing_controls": UNPRIVILEGED_GAPS}
    for name, fields in sections.items():
        data[name] = fields
    return Policy.from_dict(data)


def sandbox_factory(transport: Transport | None = None,
                    runtime: str | None = None) -> Iterator[Callable[..., Sandbox]]:
    """Yields make(timeout, envs, metadata, **policy_sections); kills what it made afterwards."""
    made: list[Sandbox] = []

    def make(timeout: float | None = None, envs: dict[str, str] | None = None,
             metadata: dict[str, str] | None = None, **sections: dict[str, Any]) -> Sandbox:
        sb = Sandbox.create(policy=base_policy(**sections), timeout=timeout, envs=envs, metadata=metadata,
                            runtime=runtime, transport=transport)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.kill()


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Sandbox]]:
    yield from sandbox_factory()


@pytest.fixture
def sandbox(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    return make_sandbox()


def host_runtime(name: str = "jail") -> Any:
    """This test process's runtime of that name (the one the SDK's local mode uses)."""
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    async def get() -> Any:
        return await (await _transport(None).manager()).runtime_named(name)

    return portal().call(get())


def sandbox_traces(runtime: dict[str, Any], sandbox_id: str) -> list[str]:
    """What of a sandbox still exists on the host, as its runtime finds it from its info().runtime facts."""
    return host_runtime(str(runtime["runtime"])).leftovers(sandbox_id, runtime)  # type: ignore[no-any-return]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory a sandbox's unprivileged uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="stockade-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def api_server() -> Iterator[Any]:
    """One `stockade serve` for the session (the conformance suite's remote backend). When it stops, every
    sandbox it ran must be gone from the host."""
    from .conformance.conftest import RUNNABLE
    from .server_support import RunningServer

    # it serves every runtime under test; the conformance tenant may use the host resources tests give it
    # (mounts, secrets, CA files) and a warm pool for the suite's usual policy: most of the suite then runs
    # in warm sandboxes
    server = RunningServer(runtimes=RUNNABLE,
                           tenants={"conformance": {"allow_mounts": ["/"], "allow_secrets": ["*"],
                                                    "allow_ca_files": ["/"],
                                                    "allow_private": ["0.0.0.0/0", "::/0"]}},
                           warm_pool=2, warm_pool_policy=base_policy().model_dump(mode="json"))
    yield server
    manager = server.server.manager
    server.stop()
    assert manager is not None and not manager.sandboxes
    leftovers = [t for sid in manager.tombstones for rt in manager.runtimes.values() for t in rt.leftovers(sid)]
    assert not leftovers, f"the server left sandboxes behind: {leftovers}"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """At the end of the session: every sandbox this test process created is gone without a trace.
    (Only its own: another stockade process on the host may have live sandboxes.)"""
    yield
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    async def created_here() -> tuple[list[str], list[str]]:
        manager = await _transport(None).manager()
        await manager.shutdown()
        ids = list(manager.tombstones)
        return ids, [t for sid in ids for rt in manager.runtimes.values() for t in rt.leftovers(sid)]

    ids, leftovers = portal().call(created_here())
    assert not leftovers, f"the tests left sandboxes behind: {leftovers}"
    # artifacts outlive sandboxes by design; the test sandboxes' ones go with the session
    from stockade.artifacts import DirectoryStore

    data_dir = HostConfig.from_env().data_dir
    store = DirectoryStore(data_dir / "artifacts")
    for sid in ids:
        store.remove_all(sid)
