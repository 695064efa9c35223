"""The one registry of live sandboxes (core/owners.py), as the server's quotas, ownership and one-sandbox-per-
user rule see it: a create in flight holds its share before its sandbox exists, every share is freed exactly
once however the sandbox ends (or its create fails), and a restarted server counts nothing of the earlier
run. Over the fake runtime (tests/fake_runtime.py), whose starts a test can hold, fail, or give a template's
start and ready commands."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.core.manager import Manager
from stockade.errors import SandboxUnavailableError
from stockade.runtime.base import RuntimeSandbox, SandboxSpec
from stockade.templates import TemplateConfig

from .fake_runtime import FakeRuntime
from .server_support import RunningServer
from .waiting import wait_until

TENANTS = {
    "one": {"max_sandboxes": 1},
    "two": {"max_sandboxes": 2},
    "three": {"max_sandboxes": 3},
    "reuse": {"one_sandbox_per_user": "reuse"},
}
POLICY = {"network": {"mode": "none"}}


class HeldRuntime(FakeRuntime):
    """The fake runtime, with starts a test can hold (``hold`` set: they wait), make fail, or hand a
    template's config (so the core runs its start and ready commands before handing the sandbox out)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.waiting = 0
        self.fail = False
        self.template_config: TemplateConfig | None = None

    async def start(self, spec: SandboxSpec) -> RuntimeSandbox:
        self.waiting += 1
        try:
            while self.hold.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.waiting -= 1
        if self.fail:
            raise SandboxUnavailableError("this start was made to fail by the test")
        sandbox = await super().start(spec)
        sandbox.template_config = self.template_config
        return sandbox


@pytest.fixture(scope="module")
def held() -> Iterator[tuple[RunningServer, HeldRuntime]]:
    runtime = HeldRuntime()
    server = RunningServer(runtime=runtime, tenants=TENANTS)
    yield server, runtime
    manager = server.server.m
    server.stop()
    left = [t for sid in manager.tombstones for t in runtime.leftovers(sid)]
    runtime.close()
    assert not manager.sandboxes and not manager.reservations and not left, left


class Tenant:
    """A tenant's HTTP client; kills what it created when the test ends."""

    def __init__(self, server: RunningServer, name: str) -> None:
        self.name = name
        self.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key(name)}"},
                                 timeout=60)
        self.made: list[str] = []

    def create(self, **body: Any) -> httpx.Response:
        r = self.http.post("/sandboxes", json={"policy": POLICY, **body})
        if r.status_code == 201:
            self.made.append(r.json()["sandbox_id"])
        return r

    def ended(self) -> dict[str, str]:
        rows = self.http.get("/sandboxes", params={"state": "ended"}).json()
        return {row["sandbox_id"]: row["end_reason"] for row in rows}

    def close(self) -> None:
        for sid in self.made:
            self.http.delete(f"/sandboxes/{sid}")
        self.http.close()


@pytest.fixture
def tenant(held: tuple[RunningServer, HeldRuntime]) -> Iterator[Any]:
    server, runtime = held
    made: list[Tenant] = []

    def make(name: str) -> Tenant:
        made.append(Tenant(server, name))
        return made[-1]

    yield make
    runtime.hold.clear()
    runtime.fail = False
    runtime.template_config = None
    for t in made:
        t.close()


def _manager(held: tuple[RunningServer, HeldRuntime]) -> Manager:
    return held[0].server.m


def _held_reservations(manager: Manager, tenant: str) -> int:
    return sum(r.tenant == tenant for r in list(manager.reservations.values()))


def test_creates_in_flight_hold_the_quota_so_concurrent_ones_never_overshoot(
        held: tuple[RunningServer, HeldRuntime], tenant: Any) -> None:
    _, runtime = held
    manager, three = _manager(held), tenant("three")
    runtime.hold.set()  # every start waits: the quota can only be held by reservations
    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(three.create) for _ in range(6)]
        wait_until(lambda: runtime.waiting == 3 and sum(a.done() for a in answers) == 3, 20,
                   "three creates to hold the quota and three to be refused",
                   show=lambda: (runtime.waiting, [a.result().status_code for a in answers if a.done()]))
        refused = [a.result() for a in answers if a.done()]
        assert {r.status_code for r in refused} == {429}
        assert all("has 3 running sandboxes" in r.json()["message"] for r in refused)
        assert _held_reservations(manager, "three") == 3 and not manager.owned_by("three")
        runtime.hold.clear()
        statuses = sorted(a.result().status_code for a in answers)
    assert statuses == [201] * 3 + [429] * 3
    assert _held_reservations(manager, "three") == 0 and len(manager.owned_by("three")) == 3
    assert three.create().status_code == 429  # the three sandboxes now hold what their reservations held


def test_a_create_that_fails_frees_its_share(held: tuple[RunningServer, HeldRuntime], tenant: Any) -> None:
    _, runtime = held
    one = tenant("one")
    runtime.fail = True
    failed = one.create()
    assert failed.status_code == 503 and "made to fail" in failed.json()["message"]
    runtime.fail = False
    assert _held_reservations(_manager(held), "one") == 0
    assert one.create().status_code == 201  # the failed create took nothing with it
    assert one.create().status_code == 429


def _kill_its_processes(owner: Tenant, sandbox_id: str) -> None:
    pid = owner.http.get(f"/sandboxes/{sandbox_id}").json()["runtime"]["unshare_pid"]
    os.killpg(pid, signal.SIGKILL)  # the sandbox dies on its own, as far as the core can tell


@pytest.mark.parametrize("how", ["killed", "died", "timed out"])
def test_a_sandbox_frees_exactly_its_own_share_however_it_ends(held: tuple[RunningServer, HeldRuntime],
                                                               tenant: Any, how: str) -> None:
    manager, two = _manager(held), tenant("two")
    first = two.create(**({"timeout": 1} if how == "timed out" else {}))
    second = two.create()
    assert first.status_code == second.status_code == 201
    assert two.create().status_code == 429
    sid = first.json()["sandbox_id"]
    if how == "killed":
        assert two.http.delete(f"/sandboxes/{sid}").status_code == 204
    elif how == "died":
        _kill_its_processes(two, sid)
    wait_until(lambda: sid not in manager.sandboxes, 20, f"sandbox {sid} to end ({how})")
    assert two.create().status_code == 201  # its share is free...
    refused = two.create()  # ...and only its own: the other two still hold theirs
    assert refused.status_code == 429 and "has 2 running sandboxes" in refused.json()["message"]
    reason = {"killed": "killed", "died": "the sandbox stopped unexpectedly", "timed out": "its timeout expired"}[how]
    ended = wait_until(lambda: two.ended().get(sid), 10, f"the row of {sid} to be closed")
    assert reason in ended
    gone = two.http.get(f"/sandboxes/{sid}")
    assert gone.status_code == 404 and reason in gone.json()["message"]


def test_a_users_create_in_flight_is_their_one_sandbox(held: tuple[RunningServer, HeldRuntime],
                                                       tenant: Any) -> None:
    _, runtime = held
    solo = tenant("reuse")
    runtime.hold.set()
    with ThreadPoolExecutor(1) as pool:
        first: Future[httpx.Response] = pool.submit(solo.create, user_id="u1")
        wait_until(lambda: runtime.waiting == 1, 20, "the first create to be in flight")
        again = solo.create(user_id="u1")
        assert again.status_code == 409 and "one sandbox per user" in again.json()["message"]
        runtime.hold.clear()
        made = first.result()
    assert made.status_code == 201
    reused = solo.create(user_id="u1")
    assert reused.status_code == 200 and reused.json()["sandbox_id"] == made.json()["sandbox_id"]


def test_a_sandbox_whose_template_is_not_ready_is_counted_but_shown_to_no_one(
        held: tuple[RunningServer, HeldRuntime], tenant: Any) -> None:
    """Between its registration and its ready command's success a sandbox exists in the core and holds its
    owner's quota, but nobody may use it yet: its id is not found, it is not listed, its user's second
    create is a conflict."""
    _, runtime = held
    manager, one = _manager(held), tenant("one")
    runtime.template_config = TemplateConfig(start_command=["sleep", "60"],
                                             ready_command=["sh", "-c", "test -e \"$HOME/ready\""])
    with ThreadPoolExecutor(1) as pool:
        creating = pool.submit(one.create, user_id="u1")
        sb = wait_until(lambda: next(iter(s for s in list(manager.sandboxes.values()) if s.tenant == "one"), None),
                        20, "the template sandbox to be registered")
        assert not sb.ready and _held_reservations(manager, "one") == 0
        r = one.http.get(f"/sandboxes/{sb.id}")
        assert r.status_code == 404 and "does not exist" in r.json()["message"]
        assert one.http.get("/sandboxes").json() == []
        refused = one.create()
        assert refused.status_code == 429 and "has 1 running sandboxes" in refused.json()["message"]
        (runtime.root / sb.id / "ready").touch()
        made = creating.result()
    assert made.status_code == 201 and made.json()["sandbox_id"] == sb.id
    assert [s["sandbox_id"] for s in one.http.get("/sandboxes").json()] == [sb.id]
    assert one.http.get(f"/sandboxes/{sb.id}").status_code == 200


def test_a_restarted_server_counts_nothing_of_the_earlier_run(tmp_path: Path) -> None:
    """A server that starts over the database of one whose process died closes that run's rows: their
    sandboxes answer 404 saying so, and hold none of the tenant's quota in the new run."""
    runtimes = [FakeRuntime(), FakeRuntime()]
    servers: list[RunningServer] = []
    try:
        servers.append(RunningServer(data_dir=tmp_path, runtime=runtimes[0], tenants=TENANTS))
        key = servers[0].key("one")
        before = httpx.post(f"{servers[0].url}/sandboxes", json={"policy": POLICY},
                            headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert before.status_code == 201
        sid = before.json()["sandbox_id"]
        # the successor, over the same database (the earlier process still holds its sandbox here, as a
        # killed one's would still be on the host until the sweep; it is the rows that carry over)
        servers.append(RunningServer(data_dir=tmp_path, runtime=runtimes[1], tenants=TENANTS))
        with httpx.Client(base_url=servers[1].url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            gone = http.get(f"/sandboxes/{sid}")
            assert gone.status_code == 404 and "server restarted" in gone.json()["message"]
            assert sid in [row["sandbox_id"] for row in http.get("/sandboxes", params={"state": "ended"}).json()]
            assert http.get("/sandboxes").json() == []
            assert http.post("/sandboxes", json={"policy": POLICY}).status_code == 201  # the quota is all free
            assert http.post("/sandboxes", json={"policy": POLICY}).status_code == 429
    finally:
        managers = [s.server.m for s in servers]
        for server in reversed(servers):
            server.stop()
        left = [t for m, rt in zip(managers, runtimes, strict=False) for sid in m.tombstones
                for t in rt.leftovers(sid)]
        for rt in runtimes:
            rt.close()
    assert not left, left
