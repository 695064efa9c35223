"""The manager's reaction to a sandbox that breaks the protocol or dies: it ends the sandbox, cleans up
everything, and keeps serving the others."""

from __future__ import annotations

import pytest

from stockade import Sandbox, SandboxNotFoundError
from stockade.sdk.portal import portal
from stockade.sdk.sandbox import _transport

from .conftest import sandbox_traces
from .waiting import wait_until


async def _feed_as_agent(sandbox_id: str, data: bytes) -> None:
    manager = await _transport(None).manager()
    manager.get(sandbox_id).runtime.channel._reader.feed_data(data)


def wait_gone(sb: Sandbox, runtime: dict) -> None:
    wait_until(lambda: not sb.is_running() and not sandbox_traces(runtime, sb.sandbox_id), 10,
               f"sandbox {sb.sandbox_id} to end and leave no trace",
               show=lambda: (sb.is_running(), sandbox_traces(runtime, sb.sandbox_id)))


def test_a_protocol_violation_ends_the_sandbox_and_nothing_else(make_sandbox):
    victim, bystander = make_sandbox(), make_sandbox()
    runtime = victim.info().runtime
    portal().call(_feed_as_agent(victim.sandbox_id, (0xFFFFFFFF).to_bytes(4, "big") + b"\0\0\0\0"))
    wait_gone(victim, runtime)
    assert not sandbox_traces(runtime, victim.sandbox_id)
    with pytest.raises(SandboxNotFoundError, match="violated the protocol"):
        victim.commands.run("true")
    assert bystander.commands.run("echo unharmed").stdout == "unharmed\n"


def test_an_agent_that_dies_ends_the_sandbox(make_sandbox):
    import os
    import signal

    sb = make_sandbox()
    runtime = sb.info().runtime
    os.kill(runtime["agent_host_pid"], signal.SIGKILL)
    wait_gone(sb, runtime)
    with pytest.raises(SandboxNotFoundError, match="stopped unexpectedly"):
        sb.files.list()
    assert not sandbox_traces(runtime, sb.sandbox_id)


def test_broker_directories_of_dead_owners_are_swept():
    async def sweep(name):  # type: ignore[no-untyped-def]
        runtime = (await _transport(None).manager()).runtime
        stale = runtime.net_dir / name
        stale.mkdir(parents=True)
        (stale / "broker.sock").touch()
        found = runtime.leftovers(name)
        return found, await runtime.sweep_stale(), stale.exists(), runtime.leftovers(name)

    found, removed, still_there, after = portal().call(sweep("sbx-deadbeefdeadbeef"))
    assert any("broker socket directory" in t for t in found)
    assert "sbx-deadbeefdeadbeef" in removed and not still_there and after == []


RAISED = r"""
import json, resource, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from stockade import Policy, Sandbox
policy = Policy.from_dict(json.loads(sys.argv[1]))
with Sandbox.create(policy=policy) as sb:
    inside = sb.commands.run("ulimit -n").stdout.strip()
print(json.dumps({"host": resource.getrlimit(resource.RLIMIT_NOFILE), "hard": hard, "inside": inside}))
"""


def test_a_host_process_lifts_its_open_files_limit_and_sandboxes_keep_theirs():
    """A soft RLIMIT_NOFILE of 256 (1024 is common) would stop a server after ~50-200 sandboxes with EMFILE:
    the manager lifts it to the hard limit; commands in a sandbox still get limits.open_files."""
    import json
    import subprocess
    import sys

    from .conftest import base_policy

    policy = base_policy()
    out = subprocess.run([sys.executable, "-c", RAISED, policy.model_dump_json()], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["host"] == [got["hard"], got["hard"]]
    assert got["inside"] == str(policy.limits.open_files)
