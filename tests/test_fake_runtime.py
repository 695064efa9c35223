"""The core, the server and the SDK over the fake runtime (tests/fake_runtime.py): the real agent without
the jail, so what they do is tested apart from what the jail enforces, and the runtime boundary is shown
to carry a runtime that is not the jail."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from stockade import PolicyError, Sandbox, SandboxNotFoundError, SandboxUnavailableError

from .fake_runtime import FakeRuntime
from .server_support import RunningServer
from .waiting import wait_until


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[RunningServer, FakeRuntime]]:
    runtime = FakeRuntime()
    server = RunningServer(runtime=runtime)
    yield server, runtime
    manager = server.server.manager
    server.stop()
    assert manager is not None
    left = [t for sid in manager.tombstones for t in runtime.leftovers(sid)]
    runtime.close()
    assert not left, left


@pytest.fixture
def sb(fake_server: tuple[RunningServer, FakeRuntime]) -> Iterator[Sandbox]:
    server, _ = fake_server
    sandbox = Sandbox.create(api_url=server.url, api_key=server.key("fake"))
    yield sandbox
    sandbox.kill()


def test_commands_files_and_info_run_over_the_fake_runtime(sb: Sandbox) -> None:
    info = sb.info().runtime
    assert info["runtime"] == "fake"
    r = sb.commands.run("echo $GREETING; pwd", envs={"GREETING": "hi"})
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "hi"
    home = r.stdout.splitlines()[1]  # the layout's home is the default cwd, and where relative paths start
    sb.files.write("notes.txt", "kept")
    assert sb.files.read(f"{home}/notes.txt") == "kept"
    assert [e.name for e in sb.files.list(".")] == ["notes.txt"]
    assert sb.commands.run("cat", stdin=b"in").stdout == "in"
    timed = sb.commands.run("sleep 30", timeout=1)
    assert timed.timed_out and timed.limit == "limits.command_timeout"


def test_kill_all_reaches_only_the_sandboxs_own_processes(sb: Sandbox) -> None:
    outside = subprocess.Popen(["sleep", "60"])
    try:
        handle = sb.commands.run("sleep 60", background=True)
        assert sb.commands.kill_all() >= 1
        assert handle.wait().exit_code == -9
        assert outside.poll() is None  # a host process of the same uid is not the sandbox's
    finally:
        outside.kill()
        outside.wait()


def test_a_cell_runs_on_the_runtimes_python(sb: Sandbox) -> None:
    assert sb.run_code("x = 20\nx + 22").text == "42"
    assert sb.run_code("x").text == "20"


def test_a_killed_sandbox_leaves_nothing_and_answers_not_found(fake_server: tuple[RunningServer, FakeRuntime],
                                                               sb: Sandbox) -> None:
    _, runtime = fake_server
    described = sb.info().runtime
    assert runtime.leftovers(sb.sandbox_id, described)  # its home and its unshare, while it runs
    sb.kill()
    wait_until(lambda: not runtime.leftovers(sb.sandbox_id, described), 10, "the fake sandbox to leave nothing",
               show=lambda: runtime.leftovers(sb.sandbox_id, described))
    with pytest.raises(SandboxNotFoundError):
        sb.commands.run("true")


def test_a_control_the_runtime_cannot_give_is_an_error(fake_server: tuple[RunningServer, FakeRuntime]) -> None:
    server, _ = fake_server
    with pytest.raises(SandboxUnavailableError, match="no egress"):
        Sandbox.create(policy={"network": {"mode": "allowlist", "allow": ["a.test"]}}, api_url=server.url,
                       api_key=server.key("fake"))


def test_a_template_is_refused_as_by_a_runtime_that_cannot_run_one(fake_server: tuple[RunningServer, FakeRuntime]
                                                                   ) -> None:
    """The fake runtime has no root to put a template's layers under: like rootless gVisor it refuses the
    template by its field, leaving nothing, and the create's share of the quota is free again."""
    server, runtime = fake_server
    key = server.key("fake-template")
    with pytest.raises(PolicyError) as refused:
        Sandbox.create(template="anything", api_url=server.url, api_key=key)
    assert refused.value.field == "template" and "runs no templates" in str(refused.value)
    manager = server.server.m
    assert not manager.reservations and not manager.owned_by("fake-template")
    assert sorted(p.name for p in runtime.root.iterdir()) == ["agent"]  # no home was made for it
