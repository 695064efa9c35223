"""A command's processes end with it when it times out or is killed, wherever they went (sessions, groups,
double forks); what a finished command left running on purpose keeps running; the agent keeps serving
while user code holds every pid it may."""

from __future__ import annotations

import os

import pytest

from ..conftest import ROOT
from ..waiting import wait_until

# Ways a process leaves its command's session, group or parent. Each leaves a `sleep 3001` (or 3002).
ESCAPES = {
    "setsid-subshell": "(setsid sleep 3001 &)",
    "setsid-fork": "setsid -f sleep 3001",
    "double-fork-setsid": "(setsid sh -c 'sleep 3001 & sleep 3002' &)",
    "nohup": "(nohup sleep 3001 >/dev/null 2>&1 &)",
    "disown": "bash -c 'sleep 3001 & disown'",
    "setpgid": "(python3 -c \"import os; os.setpgid(0, 0); os.execvp('sleep', ['sleep', '3001'])\" &)",
    "daemon": "python3 -c \"import os\nif os.fork(): os._exit(0)\nos.setsid()\nif os.fork(): os._exit(0)\n"
              "os.chdir('/'); os.execvp('sleep', ['sleep', '3001'])\"",
}


def markers(sb) -> list[str]:  # noqa: ANN001
    return [line for line in sb.commands.run("ps -eo args").stdout.splitlines() if line.startswith("sleep 300")]


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_timeout_ends_every_process_the_command_started(make_sandbox, escape):
    sb = make_sandbox()
    r = sb.commands.run(f"{ESCAPES[escape]}; sleep 1000", timeout=2)
    assert r.timed_out
    wait_until(lambda: not markers(sb), 5, "every process the command started to end", show=lambda: markers(sb))


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_kill_ends_every_process_a_background_command_started(make_sandbox, escape):
    sb = make_sandbox()
    handle = sb.commands.run(f"{ESCAPES[escape]}; sleep 1000", background=True)
    wait_until(lambda: markers(sb), 10, "the escaped process to start")
    assert handle.kill()
    assert handle.wait().exit_code == -9
    wait_until(lambda: not markers(sb), 5, "every process the command started to end", show=lambda: markers(sb))


def test_what_a_finished_command_left_running_keeps_running(make_sandbox):
    sb = make_sandbox()
    assert sb.commands.run("sleep 3001 >/dev/null 2>&1 & echo started").stdout == "started\n"
    assert sb.commands.run("(setsid sleep 3002 >/dev/null 2>&1 &); echo started").stdout == "started\n"
    background = sb.commands.run("sleep 1000", background=True)
    # another command's timeout and kill end only that command's processes
    assert sb.commands.run("(setsid sleep 3009 &); sleep 1000", timeout=1).timed_out
    doomed = sb.commands.run("sleep 1000", background=True)
    assert doomed.kill()
    wait_until(lambda: sorted(markers(sb)) == ["sleep 3001", "sleep 3002"], 5,
               "only the left-running sleeps to remain", show=lambda: markers(sb))
    assert background.pid in {p.pid for p in sb.commands.list()}


def test_kill_all_ends_everything_but_the_agent(make_sandbox):
    sb = make_sandbox()
    assert sb.run_code("x = 1\nx").text == "1"
    handle = sb.commands.run("(setsid sleep 3001 &); sleep 1000", background=True)
    sb.commands.run("sleep 3002 >/dev/null 2>&1 &")
    wait_until(lambda: len(markers(sb)) == 2, 10, "both sleeps to run", show=lambda: markers(sb))
    killed = sb.commands.kill_all()
    assert killed >= 4  # the background sh, its sleeps, the left-running sleep, the code interpreter
    assert handle.wait().exit_code == -9
    assert sb.commands.list() == []
    left = sb.commands.run(["ps", "-eo", "pid="]).stdout.split()
    assert len(left) == 2 and left[0] == "1", left  # the agent, and this ps
    # usable afterwards: commands, files and a fresh code context
    assert sb.commands.run("echo alive").stdout == "alive\n"
    assert sb.run_code("'fresh'").text == "'fresh'"


FILL = r"""
import os, sys, time
n = 0
while n < 2000:
    try:
        pid = os.fork()
    except OSError as e:
        with open("/tmp/full", "w") as f:
            f.write(f"full after {n}: {e.strerror}")
        break
    if pid == 0:
        os.setsid()
        time.sleep(1000)
        os._exit(0)
    n += 1
time.sleep(1000)
"""

_RLIMIT_PER_NAMESPACE = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2]) >= (5, 14)


@pytest.mark.skipif(not ROOT and not _RLIMIT_PER_NAMESPACE,
                    reason="without cgroups the pids limit is RLIMIT_NPROC, per user namespace from Linux 5.14")
def test_the_agent_serves_while_user_code_holds_every_pid(make_sandbox):
    sb = make_sandbox(limits={"pids": 40})
    filler = sb.commands.run(["python3", "-c", FILL], background=True)
    wait_until(lambda: sb.files.exists("/tmp/full"), 30, "the filler to hold every pid (/tmp/full)")
    assert "Resource temporarily unavailable" in sb.files.read("/tmp/full")
    # the agent still answers and starts commands
    assert filler.pid in {p.pid for p in sb.commands.list()}
    assert sb.commands.run("echo alive").stdout == "alive\n"
    assert filler.kill()
    assert filler.wait().exit_code == -9
    r = sb.commands.run(["ps", "-eo", "pid="])
    assert r.exit_code == 0 and len(r.stdout.split()) == 2, r


def test_setsid_fork_bomb_ends_with_its_timeout(make_sandbox):
    if not ROOT and not _RLIMIT_PER_NAMESPACE:
        pytest.skip("without cgroups the pids limit is RLIMIT_NPROC, per user namespace from Linux 5.14")
    sb = make_sandbox(limits={"pids": 48})
    bomb = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()
            except OSError:
                time.sleep(0.01)
    os._exit(0)
time.sleep(1000)
"""
    r = sb.commands.run(["python3", "-c", bomb], timeout=3)
    assert r.timed_out
    assert sb.commands.run("echo next").stdout == "next\n"
    wait_until(lambda: int(sb.commands.run("ps -e | wc -l").stdout or 99) < 6, 5, "the fork bomb's processes to end",
               show=lambda: sb.commands.run("ps -eo pid,args").stdout)


LEAVE_THE_TREE = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
print("prctl", libc.prctl(36, 0, 0, 0, 0), ctypes.get_errno(), flush=True)  # PR_SET_CHILD_SUBREAPER, 0
if os.fork() == 0:              # an orphan: with the flag cleared it would go to the agent
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "3001"])
    os._exit(0)
child = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT | SIGCHLD): a sibling, not a child
if child == 0:
    os.execvp("sleep", ["sleep", "3002"])
print("clone", child, ctypes.get_errno(), flush=True)
time.sleep(1000)
"""


def test_a_command_cannot_move_its_processes_out_of_its_tree(make_sandbox):
    """The command's top process may not clear its subreaper flag nor clone siblings of itself (EPERM),
    so its timeout still ends everything it started."""
    sb = make_sandbox()
    sb.files.write("leave.py", LEAVE_THE_TREE)
    r = sb.commands.run("exec python3 leave.py", timeout=3)
    assert r.timed_out
    assert "prctl -1 1\n" in r.stdout and "clone -1 1\n" in r.stdout, r.stdout + r.stderr
    wait_until(lambda: not markers(sb), 5, "every process the command started to end", show=lambda: markers(sb))
