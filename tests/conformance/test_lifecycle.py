"""Kill and expiry remove every process, mount namespace, cgroup and lock of a sandbox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade import PolicyError, Sandbox, SandboxNotFoundError

from ..conftest import ROOT, sandbox_traces, wait_until


def busy_sandbox(sb: Sandbox) -> None:
    """Leave processes of every kind behind: a daemon in its own session, an orphan, a shm file."""
    sb.commands.run("setsid sleep 1000 & (sleep 1000 &) ; echo x > /dev/shm/seg; echo y > /tmp/t")
    sb.commands.run("sleep 1000", background=True)


def test_kill_leaves_nothing_behind(make_sandbox):
    sb = make_sandbox()
    busy_sandbox(sb)
    runtime = sb.info().runtime
    assert sandbox_traces(runtime, sb.sandbox_id), "the sandbox should be visible before kill"
    assert sb.kill() is True
    assert wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id)), sandbox_traces(runtime, sb.sandbox_id)
    assert not sb.is_running()
    assert sb.kill() is False  # idempotent
    with pytest.raises(SandboxNotFoundError, match="killed"):
        sb.commands.run("true")


def test_expiry_kills_and_leaves_nothing_behind(make_sandbox):
    sb = make_sandbox(timeout=1)
    busy_sandbox(sb)
    runtime = sb.info().runtime
    assert wait_until(lambda: not sb.is_running(), 5)
    assert wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id))
    with pytest.raises(SandboxNotFoundError, match="timeout expired"):
        sb.files.read("/tmp/t")


def test_set_timeout_extends_and_shortens(make_sandbox):
    sb = make_sandbox(timeout=1)
    sb.set_timeout(30)
    time.sleep(1.5)
    assert sb.is_running()
    sb.set_timeout(0.5)
    assert wait_until(lambda: not sb.is_running(), 5)


def test_max_lifetime_caps_timeouts(make_sandbox):
    sb = make_sandbox(lifetime={"timeout": "1s", "max_lifetime": "2s"})
    with pytest.raises(PolicyError, match="max_lifetime"):
        sb.set_timeout(60)
    sb.set_timeout(1.9)
    with pytest.raises(PolicyError, match="max_lifetime"):
        make_sandbox(timeout=10, lifetime={"timeout": "1s", "max_lifetime": "2s"})


def test_context_manager_kills(transport, runtime_name):
    from ..conftest import base_policy

    with Sandbox.create(policy=base_policy(), transport=transport, runtime=runtime_name) as sb:
        runtime = sb.info().runtime
    assert wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id))


def test_list_and_connect(make_sandbox, transport):
    a = make_sandbox(metadata={"role": "a"})
    b = make_sandbox(metadata={"role": "b"})
    ids = {info.sandbox_id for info in Sandbox.list(transport=transport)}
    assert {a.sandbox_id, b.sandbox_id} <= ids
    assert [i.sandbox_id for i in Sandbox.list(metadata={"role": "b"}, transport=transport)
            if i.sandbox_id in (a.sandbox_id, b.sandbox_id)] == [b.sandbox_id]
    again = Sandbox.connect(a.sandbox_id, transport=transport)
    assert again.commands.run("echo same").stdout == "same\n"
    a.kill()
    assert a.sandbox_id not in {info.sandbox_id for info in Sandbox.list(transport=transport)}
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(a.sandbox_id, transport=transport)


CREATOR = """
import json, sys, time
sys.path[:0] = {path!r}
from stockade import Sandbox, Policy
from tests.conftest import base_policy
sb = Sandbox.create(policy=base_policy(), timeout=600)
sb.commands.run("setsid sleep 1000 &")
print(sb.sandbox_id, json.dumps(sb.info().runtime), flush=True)
time.sleep(600)
"""


def test_sandbox_dies_with_the_process_that_created_it():
    """The host process that owns a sandbox is SIGKILLed: the sandbox dies at once (bwrap's
    --die-with-parent), and the next stockade process removes the cgroup it left."""
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    portal().call(_transport(None).manager())  # this process's own start-up sweep is behind us
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", CREATOR.format(path=[root, root + "/src"])],
                            stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id, facts = proc.stdout.readline().split(" ", 1)
        runtime = json.loads(facts)
        agent_pid = runtime["agent_host_pid"]
        assert os.path.exists(f"/proc/{agent_pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: not os.path.exists(f"/proc/{agent_pid}"))
    process_traces = lambda: [t for t in sandbox_traces(runtime, sandbox_id) if "process" in t]  # noqa: E731
    assert wait_until(lambda: not process_traces()), process_traces()
    # what is left (an empty cgroup, a lock file nobody holds) goes when stockade next starts
    swept = portal().call(_sweep(_transport(None)))
    assert not sandbox_traces(runtime, sandbox_id)
    if ROOT:
        assert sandbox_id in swept


async def _sweep(transport):
    m = await transport.manager()
    return await m.runtime.sweep_stale()
