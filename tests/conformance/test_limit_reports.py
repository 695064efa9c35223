"""Hitting a limit is reported as such: which limit, its value, and the policy field that raises it."""

from __future__ import annotations

import pytest

from ..conftest import ROOT

needs_cgroups = pytest.mark.skipif(not ROOT, reason="the OOM-kill counter is the memory cgroup's")
BOMB = "b = []\nwhile True: b.append(bytearray(1 << 20))"


def assert_gvisor_oom_ends_the_sandbox(sb, call, limit: str) -> None:  # noqa: ANN001
    """gVisor's documented answer: its kernel is one host process, so the memory cgroup's OOM kill ends
    the whole sandbox; what the caller gets says so, with the limit's value and field."""
    from stockade import SandboxUnavailableError

    with pytest.raises(SandboxUnavailableError, match=rf"out of memory: .*\({limit}\).*raise limits\.memory"):
        call()
    assert not sb.is_running()


@needs_cgroups
@pytest.mark.privileged
def test_an_out_of_memory_kill_says_so(make_sandbox, runtime_name):
    sb = make_sandbox(limits={"memory": "64MiB"})
    if runtime_name == "gvisor":
        return assert_gvisor_oom_ends_the_sandbox(sb, lambda: sb.commands.run(["python3", "-c", BOMB]), "64MiB")
    r = sb.commands.run(["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"])
    assert r.exit_code == -9 and not r.timed_out
    assert r.limit == "limits.memory"
    assert r.error is not None and "out of memory" in r.error and "64MiB" in r.error


@needs_cgroups
@pytest.mark.privileged
def test_a_shell_whose_child_was_killed_for_memory_says_so(make_sandbox, runtime_name):
    """The shell survives and exits 137: the command did not die of a signal, but its process did."""
    sb = make_sandbox(limits={"memory": "64MiB"})
    if runtime_name == "gvisor":  # no shell survives: the sandbox ends
        return assert_gvisor_oom_ends_the_sandbox(
            sb, lambda: sb.commands.run(f"python3 -c '{BOMB}'; echo after $?"), "64MiB")
    r = sb.commands.run("python3 -c 'b = []\nwhile True: b.append(bytearray(1 << 20))'; echo after $?")
    assert r.exit_code == 0 and r.stdout == "after 137\n"  # echo's status: the shell lived on
    r = sb.commands.run("python3 -c 'b = []\nwhile True: b.append(bytearray(1 << 20))'; exit $?")
    assert r.exit_code == 137 and r.limit == "limits.memory" and "killed a process" in (r.error or "")
    assert sb.commands.run("sh -c 'exit 137'").limit is None  # a plain exit status is not an OOM kill


@needs_cgroups
@pytest.mark.privileged
def test_a_plain_sigkill_is_not_called_out_of_memory(make_sandbox):
    sb = make_sandbox(limits={"memory": "64MiB"})
    r = sb.commands.run("kill -9 $$")
    assert r.exit_code == -9 and r.limit is None and r.error is None


def test_a_timeout_names_its_value_and_field(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("sleep 100", timeout=1)
    assert r.timed_out and r.limit == "limits.command_timeout"
    assert r.error is not None and "1s" in r.error and "limits.command_timeout" in r.error


def test_truncated_output_names_its_field(make_sandbox):
    sb = make_sandbox(limits={"output": "64KiB"})
    r = sb.commands.run("head -c 200000 /dev/zero")
    assert r.truncated and r.limit == "limits.output" and "limits.output" in (r.error or "")


def test_a_file_size_kill_names_its_field(make_sandbox):
    sb = make_sandbox(limits={"file_size": "1MiB"})
    r = sb.commands.run(["python3", "-c", "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
                         "open('big', 'wb').write(bytes(4 << 20))"])
    assert r.exit_code == -25 and r.limit == "limits.file_size" and "limits.file_size" in (r.error or "")


def test_a_clean_exit_reports_no_limit(make_sandbox):
    r = make_sandbox().commands.run("echo ok; exit 3")
    assert (r.exit_code, r.limit, r.error) == (3, None, None)


def test_a_cell_timeout_names_its_value_and_field(make_sandbox):
    sb = make_sandbox()
    execution = sb.run_code("import time\ntime.sleep(100)", timeout=1)
    assert execution.timed_out and execution.error is not None
    assert execution.error.name == "TimeoutError"
    assert "(1s)" in execution.error.value and "limits.command_timeout" in execution.error.value


@needs_cgroups
@pytest.mark.privileged
def test_a_cell_killed_for_memory_says_so(make_sandbox, runtime_name):
    sb = make_sandbox(limits={"memory": "128MiB"})
    if runtime_name == "gvisor":
        return assert_gvisor_oom_ends_the_sandbox(sb, lambda: sb.run_code(BOMB), "128MiB")
    execution = sb.run_code("b = []\nwhile True: b.append(bytearray(1 << 20))")
    assert execution.error is not None and execution.error.name == "MemoryError"
    assert "128MiB" in execution.error.value and "limits.memory" in execution.error.value
    assert sb.run_code("1 + 1").text == "2"


@pytest.mark.skipif(ROOT, reason="with a memory cgroup the OOM counter decides")
def test_without_a_memory_cgroup_a_sigkill_is_not_guessed_as_oom(make_sandbox):
    r = make_sandbox().commands.run("kill -9 $$")
    assert r.exit_code == -9 and r.limit is None
    assert r.error is not None and "cannot be confirmed" in r.error and "limits.memory" in r.error
