"""Resource abuse is contained, reported, and the host keeps serving new sandboxes."""

from __future__ import annotations

import time

import pytest

from stockade.runtime.jail.runtime import AGENT_PIDS_HEADROOM

from ..conftest import ROOT

needs_cgroups = pytest.mark.skipif(not ROOT, reason="cgroup limits need root (or a delegated cgroup)")


def assert_host_still_serves(make_sandbox):
    assert make_sandbox().commands.run("echo ok").stdout == "ok\n"


@needs_cgroups
def test_fork_bomb_is_capped_by_pids(make_sandbox):
    sb = make_sandbox(limits={"pids": 64, "command_timeout": "20s"})
    code = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        n += 1
except OSError as e:
    print("stopped after", n, e.strerror)
"""
    r = sb.commands.run(["python3", "-c", code], timeout=15)
    assert "stopped after" in r.stdout and "Resource temporarily unavailable" in r.stdout
    assert int(r.stdout.split()[2]) < 64
    sb.commands.run("pkill -9 -f 'python3 -c' ; true")
    assert sb.commands.run("echo still-here").stdout == "still-here\n"
    assert_host_still_serves(make_sandbox)


@needs_cgroups
def test_memory_bomb_is_killed_and_reported(make_sandbox, runtime_name):
    sb = make_sandbox(limits={"memory": "64MiB"})
    if runtime_name == "gvisor":  # the whole sandbox ends (test_limit_reports: what the caller is told)
        from stockade import SandboxUnavailableError

        with pytest.raises(SandboxUnavailableError, match="limits.memory"):
            sb.commands.run(["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"])
        assert_host_still_serves(make_sandbox)
        return
    r = sb.commands.run(["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"])
    assert r.exit_code == -9  # the OOM killer picked the bomb, not the agent
    assert sb.commands.run("echo survived").stdout == "survived\n"
    assert_host_still_serves(make_sandbox)


@needs_cgroups
def test_memory_limit_is_in_the_cgroup(make_sandbox, runtime_name):
    """The jail's cgroup files hold the policy's limits, on v1 (one directory per controller) or v2 (one
    unified directory), wherever the runtime put them."""
    if runtime_name != "jail":
        pytest.skip(f"the cgroup files checked here are the jail's; {runtime_name} is checked by its own tests")

    from ..conftest import host_runtime

    info = make_sandbox(limits={"memory": "96MiB", "pids": 77, "cpus": 0.5}).info()
    host = host_runtime("jail").cgroups
    dirs = {c: host.parents[c] / info.sandbox_id for c in ("memory", "pids", "cpu")}
    if host.version == 2:
        assert len(set(dirs.values())) == 1  # one unified directory
        memory, cpu = (dirs["memory"] / "memory.max").read_text().strip(), (dirs["cpu"] / "cpu.max").read_text()
        assert cpu.split() == ["50000", "100000"]
    else:
        memory = (dirs["memory"] / "memory.limit_in_bytes").read_text().strip()
        assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert int(memory) == 96 << 20
    # limits.pids for user code (RLIMIT_NPROC) plus the agent's headroom
    assert (dirs["pids"] / "pids.max").read_text().strip() == str(77 + AGENT_PIDS_HEADROOM)
    assert str(info.runtime["agent_host_pid"]) in (dirs["pids"] / "cgroup.procs").read_text().split()
    assert host.version == info.runtime["cgroup_version"]


@needs_cgroups
def test_cpu_is_throttled_to_the_policy(make_sandbox):
    sb = make_sandbox(limits={"cpus": 0.25})
    code = """
import os, time
t0, c0 = time.monotonic(), time.process_time()
while time.monotonic() - t0 < 1.0:
    pass
print(round((time.process_time() - c0) / (time.monotonic() - t0), 2))
"""
    share = float(sb.commands.run(["python3", "-c", code]).stdout)
    assert share < 0.5, f"a 0.25-cpu sandbox got {share} of a cpu"


def test_disk_fill_stops_at_the_workspace_size(make_sandbox):
    sb = make_sandbox(filesystem={"workspace_size": "8MiB", "tmp_size": "4MiB"})
    r = sb.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M count=64")
    assert r.exit_code != 0 and "No space left" in r.stderr
    r = sb.commands.run("dd if=/dev/zero of=/tmp/fill bs=1M count=64")
    assert "No space left" in r.stderr
    assert int(sb.commands.run("stat -c %s /tmp/fill").stdout) <= 4 << 20
    assert sb.commands.run("rm /home/user/fill && echo freed").stdout == "freed\n"


def test_file_size_rlimit(make_sandbox):
    sb = make_sandbox(limits={"file_size": "1MiB", "open_files": 64})
    r = sb.commands.run("dd if=/dev/zero of=big bs=1M count=4")
    assert r.exit_code != 0
    assert sb.files.get_info("big").size <= 1 << 20
    assert sb.commands.run("ulimit -n; ulimit -c").stdout.split() == ["64", "0"]


def test_cpu_spin_past_the_wall_time_is_killed(make_sandbox):
    sb = make_sandbox()
    start = time.monotonic()
    r = sb.commands.run(["python3", "-c", "while True: pass"], timeout=1)
    assert r.timed_out and r.exit_code == -9
    assert time.monotonic() - start < 10
    assert sb.commands.run("echo next").stdout == "next\n"


def test_timeout_kills_the_whole_process_group(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("sleep 100 & sleep 100; wait", timeout=1)
    assert r.timed_out
    assert "sleep" not in sb.commands.run("ps -eo comm").stdout


def test_output_flood_is_truncated_at_the_cap(make_sandbox):
    sb = make_sandbox(limits={"output": "64KiB"})
    r = sb.commands.run("yes flood | head -c 50000000; echo done >&2")
    assert r.truncated and not r.timed_out
    assert len(r.stdout_bytes) == 64 << 10
    assert r.stdout_bytes.startswith(b"flood\n")
    assert r.stderr == "done\n"
    assert r.exit_code == 0


def test_a_calls_timeout_may_exceed_the_default_command_timeout(make_sandbox):
    sb = make_sandbox(limits={"command_timeout": "1s"})
    r = sb.commands.run("sleep 1.5; echo done", timeout=120)
    assert (r.stdout, r.timed_out) == ("done\n", False)
    assert sb.run_code("import time; time.sleep(1.5); 'done'", timeout=120).text == "'done'"
    # the default still applies to a call without one
    r = sb.commands.run("sleep 30")
    assert r.timed_out and "(1s)" in (r.error or "")


def test_a_policy_cap_on_a_calls_timeout_names_its_field(make_sandbox):
    from stockade import PolicyError

    sb = make_sandbox(limits={"command_timeout": "5s", "max_command_timeout": "8s"})
    assert sb.commands.run("true", timeout=8).exit_code == 0
    with pytest.raises(PolicyError, match="limits.max_command_timeout"):
        sb.commands.run("true", timeout=10)
    with pytest.raises(PolicyError, match="limits.max_command_timeout"):
        sb.run_code("1", timeout=10)


def test_a_calls_timeout_cannot_outlive_the_sandbox(make_sandbox):
    from stockade import PolicyError

    sb = make_sandbox(timeout=30)
    with pytest.raises(PolicyError, match="outlives the sandbox"):
        sb.commands.run("true", timeout=120)
    with pytest.raises(PolicyError, match="outlives the sandbox"):
        sb.run_code("1", timeout=120)
