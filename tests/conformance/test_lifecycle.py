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

from stockade import Policy, PolicyError, Sandbox, SandboxNotFoundError

from ..conftest import ROOT, sandbox_traces
from ..waiting import wait_until
from .conftest import RUNTIMES_UNDER_TEST, UNMET


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
    wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id), 10, "the killed sandbox's traces to go",
               show=lambda: sandbox_traces(runtime, sb.sandbox_id))
    assert not sb.is_running()
    assert sb.kill() is False  # idempotent
    with pytest.raises(SandboxNotFoundError, match="killed"):
        sb.commands.run("true")


def test_expiry_kills_and_leaves_nothing_behind(make_sandbox):
    sb = make_sandbox(timeout=3)  # time enough to make it busy first, on a loaded host too
    busy_sandbox(sb)
    runtime = sb.info().runtime
    wait_until(lambda: not sb.is_running(), 5, "the sandbox to expire")
    wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id), 10, "the expired sandbox's traces to go",
               show=lambda: sandbox_traces(runtime, sb.sandbox_id))
    with pytest.raises(SandboxNotFoundError, match="timeout expired"):
        sb.files.read("/tmp/t")


def test_set_timeout_extends_and_shortens(make_sandbox):
    sb = make_sandbox(timeout=3)  # time enough to extend it, on a loaded host too
    first_end = sb.info().end_at.timestamp()
    sb.set_timeout(30)
    # past the deadline it was created with, as the sandbox itself reported it
    wait_until(lambda: time.time() > first_end + 0.5, 10, "the first deadline to pass")
    assert sb.is_running()
    sb.set_timeout(0.5)
    wait_until(lambda: not sb.is_running(), 5, "the shortened timeout to end the sandbox")


def test_max_lifetime_caps_timeouts(make_sandbox):
    # a cap of a minute: however slow the host, a timeout of 61 s outlives it, one of 40 s does not (for the
    # first 20 s of the sandbox's life; the old 2 s cap left a 1.9 s timeout a tenth of a second to be asked)
    lifetime = {"timeout": "10s", "max_lifetime": "60s"}
    sb = make_sandbox(lifetime=lifetime)
    with pytest.raises(PolicyError, match="max_lifetime"):
        sb.set_timeout(61)
    sb.set_timeout(40)
    assert sb.info().policy["lifetime"]["timeout"] == "40s"
    with pytest.raises(PolicyError, match="max_lifetime"):
        make_sandbox(timeout=61, lifetime=lifetime)


def test_context_manager_kills(transport, runtime_name):
    from ..conftest import base_policy

    with Sandbox.create(policy=base_policy(), transport=transport, runtime=runtime_name) as sb:
        runtime = sb.info().runtime
    wait_until(lambda: not sandbox_traces(runtime, sb.sandbox_id), 10, "the sandbox's traces to go",
               show=lambda: sandbox_traces(runtime, sb.sandbox_id))


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
sb = Sandbox.create(policy=base_policy(), timeout=600, runtime={runtime!r})
sb.commands.run("setsid sleep 1000 &")
print(sb.sandbox_id, json.dumps(sb.info().runtime), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("name", RUNTIMES_UNDER_TEST)
def test_sandbox_dies_with_the_process_that_created_it(name):
    if UNMET[name] is not None:
        pytest.skip(UNMET[name])
    """The host process that owns a sandbox is SIGKILLed: the sandbox dies at once (bwrap's
    --die-with-parent; runsc's death signal), and the next stockade process removes what it left (a cgroup,
    runsc's container state)."""
    from stockade.sdk.portal import portal
    from stockade.sdk.sandbox import _transport

    portal().call(_transport(None).manager())  # this process's own start-up sweep is behind us
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", CREATOR.format(path=[root, root + "/src"], runtime=name)],
                            stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id, facts = proc.stdout.readline().split(" ", 1)
        runtime = json.loads(facts)
        agent_pid = runtime.get("agent_host_pid") or runtime["sentry_host_pid"]  # the jail's agent, or the Sentry
        assert os.path.exists(f"/proc/{agent_pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{agent_pid}"), 10, f"the orphaned sandbox {agent_pid} to die")
    process_traces = lambda: [t for t in sandbox_traces(runtime, sandbox_id) if "process" in t]  # noqa: E731
    wait_until(lambda: not process_traces(), 10, "the orphaned sandbox's processes to end", show=process_traces)
    # what is left (an empty cgroup, a lock file nobody holds) goes when stockade next starts
    swept = portal().call(_sweep(_transport(None), name))
    assert not sandbox_traces(runtime, sandbox_id)
    if ROOT:
        assert sandbox_id in swept


async def _sweep(transport, name):
    m = await transport.manager()
    return await (await m.runtime_named(name)).sweep_stale()


HOLD_100_MIB = """
import time
b = bytearray(100 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
open("/tmp/held", "w").close()
time.sleep(600)
"""
BURN_CPU = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"


def test_get_metrics_reports_cpu_memory_and_disk(make_sandbox):
    sb = make_sandbox()
    limits = Policy.from_dict(sb.info().policy).limits
    hold = sb.commands.run(["python3", "-c", HOLD_100_MIB], background=True)
    wait_until(lambda: sb.files.exists("/tmp/held"), 30, "100 MiB to be held")
    sb.commands.run(["python3", "-c", BURN_CPU])
    sb.commands.run("head -c 10000000 /dev/urandom > /home/user/blob")
    [busy] = sb.get_metrics()
    assert busy.cpu_count == 1 and busy.mem_total == limits.memory
    assert 0 < busy.cpu_used_pct <= 100, busy
    assert (100 << 20) <= busy.mem_used <= busy.mem_total and 0 <= busy.mem_cache <= busy.mem_used, busy
    assert busy.disk_used >= 10_000_000 and busy.disk_total >= busy.disk_used, busy
    assert hold.kill()
    sb.commands.run("rm /home/user/blob")
    time.sleep(1.0)  # an idle second: the next sample's CPU average covers it (not a wait for an event)
    series = sb.get_metrics()
    assert len(series) == 2 and series[0] == busy
    idle = series[1]
    assert idle.timestamp > busy.timestamp and idle.cpu_used_pct < 50, series
    assert idle.mem_used < busy.mem_used - (50 << 20) and idle.disk_used < busy.disk_used - 5_000_000, series
    sb.kill()
    with pytest.raises(SandboxNotFoundError):
        sb.get_metrics()
