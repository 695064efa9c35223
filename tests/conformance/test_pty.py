"""PTY processes (``sandbox.pty``): the terminal is the process's stdin, stdout, stderr and controlling
terminal, of the size asked and resized on request (the kernel's SIGWINCH reaching the foreground
program); input reaches a reading program, Ctrl-C interrupts the foreground one; a kill or timeout ends
the whole tree; the output arrives whole; no process gets a terminal's master. Every runtime, every
transport."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from stockade import PolicyError, PtySize

from ..waiting import wait_until

PY_TTY = "import os; print([os.isatty(fd) for fd in (0, 1, 2)], os.ttyname(0), os.environ.get('TERM'))"


class Screen:
    """What a pty printed, read on a thread of its own (the handle's iteration blocks)."""

    def __init__(self, handle) -> None:  # noqa: ANN001
        self.handle = handle
        self.data = bytearray()
        self.called: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for chunk in self.handle:
            self.data += chunk

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = 15) -> None:
        wait_until(lambda: text in self.text(), timeout, f"{text!r} on the terminal", show=self.text)

    def result(self, timeout: float = 15):  # noqa: ANN201
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the pty did not end; it printed {self.text()!r}"
        return self.handle.wait()


def markers(sb) -> list[str]:  # noqa: ANN001
    return [line for line in sb.commands.run("ps -eo args").stdout.splitlines() if line.startswith("sleep 300")]


def test_a_pty_is_the_process_terminal(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80), cmd=["python3", "-c", PY_TTY])
    result = Screen(handle).result()
    assert result.exit_code == 0
    flags, name, term = result.stdout.strip().rsplit(" ", 2)
    assert flags == "[True, True, True]", result.stdout
    assert name.startswith("/dev/pts/"), result.stdout
    assert term == "xterm-256color"  # E2B's default TERM
    # a plain command is not on a terminal
    plain = "import os; print([os.isatty(fd) for fd in (0, 1, 2)])"
    assert sb.commands.run(["python3", "-c", plain]).stdout == "[False, False, False]\n"


def test_the_terminal_is_the_controlling_terminal_of_a_new_session(make_sandbox):
    sb = make_sandbox()
    script = ("import os; fd = os.open('/dev/tty', os.O_RDWR); "
              "print('ctty', os.getsid(0) == os.getpid(), os.tcgetpgrp(fd) == os.getpgrp())")
    result = Screen(sb.pty.create(PtySize(24, 80), cmd=["python3", "-c", script])).result()
    assert result.stdout.strip() == "ctty True True", result.stdout


def test_stty_size_shows_the_size_and_follows_a_resize(make_sandbox):
    sb = make_sandbox()
    script = ("import os, signal\n"
              "signal.signal(signal.SIGWINCH, lambda *_: print('winch', os.get_terminal_size(0), flush=True))\n"
              "print('ready', flush=True)\n"
              "input()\n")
    handle = sb.pty.create(PtySize(24, 80), cmd=["sh", "-c", f"stty size; python3 -c \"{script}\"; stty size"])
    screen = Screen(handle)
    screen.wait_for("ready")
    assert "24 80" in screen.text()
    assert handle.resize(PtySize(rows=40, cols=132))
    screen.wait_for("winch os.terminal_size(columns=132, lines=40)")  # the kernel's SIGWINCH reached it
    handle.send_stdin("\n")
    result = screen.result()
    assert result.exit_code == 0
    assert result.stdout.strip().splitlines()[-1] == "40 132", result.stdout
    events = [e for e in sb.audit_log(type="command") if e["data"].get("pid") == handle.pid]
    assert {e["type"] for e in events} >= {"command.start", "command.resize", "command.end"}
    start = next(e for e in events if e["type"] == "command.start")
    assert start["data"]["pty"] == {"rows": 24, "cols": 80}
    assert next(e for e in events if e["type"] == "command.resize")["data"] | {"pid": 0} == \
        {"pid": 0, "rows": 40, "cols": 132}


def test_a_program_reading_the_terminal_gets_input(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80), cmd=["sh", "-c", "echo prompt; read line; echo \"got:$line\""])
    screen = Screen(handle)
    screen.wait_for("prompt")
    sb.pty.send_stdin(handle.pid, b"hello terminal\r")  # Enter sends CR; the terminal makes it a newline
    result = screen.result()
    assert result.exit_code == 0
    assert "hello terminal\r\n" in result.stdout  # echoed by the terminal
    assert "got:hello terminal\r\n" in result.stdout


def test_ctrl_c_interrupts_the_foreground_program(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80), cmd=["python3", "-c", "import time\nprint('ready', flush=True)\n"
                                                 "try:\n    time.sleep(100)\nexcept KeyboardInterrupt:\n"
                                                 "    print('interrupted', flush=True)\n    raise SystemExit(3)"])
    screen = Screen(handle)
    screen.wait_for("ready")
    handle.send_stdin(b"\x03")
    result = screen.result()
    assert "interrupted" in result.stdout
    assert result.exit_code == 3


def test_an_interactive_shell_runs_jobs_in_the_foreground_and_ctrl_c_ends_them(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80))  # E2B's /bin/bash -i -l
    screen = Screen(handle)
    handle.send_stdin("echo sh''ell-up\r")
    screen.wait_for("shell-up")
    handle.send_stdin("sleep 100; echo not-''interrupted\r")
    wait_until(lambda: any(line.startswith("sleep 100") for line in
                           sb.commands.run("ps -eo args").stdout.splitlines()), 10, "the shell's sleep to start")
    handle.send_stdin(b"\x03")
    handle.send_stdin("echo status-$?\r")
    screen.wait_for("status-130")  # the sleep died of SIGINT; the shell lives on
    handle.send_stdin("exit 7\r")
    result = screen.result()
    assert result.exit_code == 7
    assert "not-interrupted" not in result.stdout


def test_kill_ends_the_pty_tree_including_a_setsid_grandchild(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80), timeout=0,
                           cmd=["sh", "-c", "(setsid sleep 3001 &); sleep 3002 & echo started; wait"])
    screen = Screen(handle)
    screen.wait_for("started")
    wait_until(lambda: len(markers(sb)) == 2, 10, "both sleeps to start", show=lambda: markers(sb))
    assert sb.pty.kill(handle.pid)
    assert screen.result().exit_code == -9
    wait_until(lambda: not markers(sb), 5, "every process of the pty to end", show=lambda: markers(sb))
    assert not sb.pty.kill(handle.pid)  # gone: nothing to kill


def test_a_timeout_ends_the_pty_and_what_it_started(make_sandbox):
    sb = make_sandbox()
    handle = sb.pty.create(PtySize(24, 80), timeout=2, cmd=["sh", "-c", "(setsid sleep 3001 &); sleep 1000"])
    result = Screen(handle).result(timeout=20)
    assert result.timed_out
    wait_until(lambda: not markers(sb), 5, "every process of the pty to end", show=lambda: markers(sb))


def test_output_over_many_kilobytes_arrives_whole(make_sandbox):
    sb = make_sandbox()
    lines = 60000  # 480 KB with the terminal's CR LF: many times the terminal's buffers
    chunks: list[bytes] = []
    write = f"import sys\nfor i in range({lines}): sys.stdout.write('%06d\\n' % i)"
    handle = sb.pty.create(PtySize(24, 80), on_data=chunks.append, cmd=["python3", "-c", write])
    result = handle.wait()
    expected = "".join(f"{i:06d}\r\n" for i in range(lines))
    assert result.exit_code == 0
    assert not result.truncated
    assert len(result.stdout) == len(expected)
    assert result.stdout == expected
    assert b"".join(chunks).decode() == expected  # on_data saw every byte, in order


def test_no_process_holds_a_terminal_master(make_sandbox):
    sb = make_sandbox()
    first = sb.pty.create(PtySize(24, 80), timeout=0, cmd=["sh", "-c", "echo up; sleep 1000"])
    screen = Screen(first)
    screen.wait_for("up")
    fds = ("import os\nlinks = {}\nfor n in os.listdir('/proc/self/fd'):\n    try:\n"
           "        links[int(n)] = os.readlink('/proc/self/fd/' + n)\n    except OSError:\n"
           "        pass  # the directory listdir read, closed since\nprint(links)")
    second = Screen(sb.pty.create(PtySize(24, 80), cmd=["python3", "-c", fds])).result()
    links = eval(second.stdout.strip())  # noqa: S307 - a list of strings our own command printed
    # 0-2 on its own slave and nothing else: no ptmx, no other terminal, no pipe or socket of the agent
    assert sorted(links) == [0, 1, 2], links
    assert len(set(links.values())) == 1 and links[0].startswith("/dev/pts/"), links
    plain = sb.commands.run(["python3", "-c", fds]).stdout
    assert "/dev/pts" not in plain and "ptmx" not in plain, plain
    assert first.kill()
    assert screen.result().exit_code == -9


def test_resize_and_input_refusals(make_sandbox):
    sb = make_sandbox()
    plain = sb.commands.run("sleep 1000", background=True)
    with pytest.raises(PolicyError) as err:
        sb.pty.resize(plain.pid, PtySize(10, 10))
    assert err.value.field == "pid"
    assert plain.kill()
    with pytest.raises(PolicyError):
        sb.pty.create(PtySize(0, 80))
    with pytest.raises(PolicyError):
        sb.pty.create(PtySize(24, 100000))
    with pytest.raises(PolicyError):
        sb.pty.create(PtySize(24, 80), user="root")
    handle = sb.pty.create(PtySize(24, 80), cmd=["sh", "-c", "echo up; sleep 1000"])
    screen = Screen(handle)
    screen.wait_for("up")
    with pytest.raises(PolicyError):
        sb.pty.resize(handle.pid, PtySize(5000, 10))
    assert sb.pty.kill(handle.pid)
    screen.result()
    assert not sb.pty.resize(handle.pid, PtySize(10, 10))  # not running any more


def test_the_async_sdk_drives_a_pty(make_sandbox, transport):
    import asyncio

    from stockade import AsyncSandbox

    sb = make_sandbox()

    async def flow() -> tuple[str, str]:
        asb = await AsyncSandbox.connect(sb.sandbox_id, transport=transport)
        seen: list[bytes] = []

        async def on_data(chunk: bytes) -> None:  # a coroutine callback is awaited
            seen.append(chunk)

        handle = await asb.pty.create(PtySize(10, 40), on_data=on_data,
                                      cmd=["sh", "-c", "stty size; read x; stty size; echo got-$x"])
        screen = b""
        async for chunk in handle:
            screen += chunk
            if b"10 40\r\n" in screen:
                break
        assert await handle.resize(PtySize(12, 50))
        await handle.send_stdin("hi\r")
        result = await handle.wait()
        assert not await asb.pty.kill(handle.pid)  # it has ended
        return result.stdout, b"".join(seen).decode()

    stdout, seen = asyncio.run(flow())
    assert stdout.endswith("12 50\r\ngot-hi\r\n"), stdout
    assert stdout.startswith("10 40\r\n") and seen == stdout


EXHAUST_PTYS = """
import os, time
held = []
try:
    for _ in range(6000):
        held.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    err = 0
except OSError as e:
    err = e.errno
with open("/tmp/ptys.tmp", "w") as f:
    f.write(f"{len(held)} {err}")
os.rename("/tmp/ptys.tmp", "/tmp/ptys")
time.sleep(60)
"""


def test_a_sandbox_never_takes_the_ptys_the_kernel_keeps_for_the_host(make_sandbox, runtime_name):
    """kernel.pty.reserve ptys are the host's (root's sshd and consoles): a devpts instance made in the
    host's first mount namespace may use them, one made elsewhere (bwrap's, or stockade's host_mounts.py)
    may not. A sandbox opens /dev/ptmx until it fails and holds what it got: the host's count stays short
    of the reserve (the jail fails with ENOSPC there; gVisor's ptys are the Sentry's, none of the host's)."""
    limit, reserve = (int(Path(f"/proc/sys/kernel/pty/{n}").read_text()) for n in ("max", "reserve"))
    if limit - reserve >= 6000:
        pytest.skip(f"this host allows {limit - reserve} ptys outside its reserve: more than the test opens")
    sb = make_sandbox(limits={"open_files": 8192})
    before = int(Path("/proc/sys/kernel/pty/nr").read_text())
    holder = sb.commands.run(["python3", "-c", EXHAUST_PTYS], background=True)
    try:
        wait_until(lambda: sb.files.exists("/tmp/ptys"), 60, "the sandbox to open its ptys")
        count, err = (int(x) for x in sb.files.read("/tmp/ptys").split())
        in_use = int(Path("/proc/sys/kernel/pty/nr").read_text())
    finally:
        holder.kill()
    assert in_use <= limit - reserve, (in_use, limit, reserve)
    if runtime_name == "jail":
        assert err == 28 and count <= limit - reserve - before, (count, err, limit, reserve, before)
    else:
        assert in_use - before < 16, (in_use, before)
