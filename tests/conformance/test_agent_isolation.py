"""User code cannot read or write the agent (PID 1), nor make it report what it did not observe."""

from __future__ import annotations

import json
import re

# Every way into another process of the same uid that /proc offers, for reading and for writing, on the
# agent's process and on each of its threads. Prints what opened (nothing should).
PROBE = r"""
import json, os
hits = []
bases = ["/proc/1"] + [f"/proc/1/task/{t}" for t in os.listdir("/proc/1/task")]
names = ["mem", "environ", "maps", "smaps", "smaps_rollup", "numa_maps", "stack", "syscall", "auxv", "pagemap",
         "personality", "io", "timers", "attr/current", "clear_refs", "coredump_filter", "comm"]
for base in bases:
    for name in names:
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            try:
                fd = os.open(f"{base}/{name}", flags)
            except OSError:
                continue
            try:
                if flags == os.O_RDONLY:
                    data = os.read(fd, 4096)
                    if name in ("comm", "coredump_filter") or not data:  # harmless to read, not to write
                        continue
                    hits.append(f"read {base}/{name}")
                else:
                    if name == "comm":
                        os.write(fd, b"forged")
                    else:
                        os.lseek(fd, 0x400000, 0)
                        os.write(fd, b"\x00" * 8)
                    hits.append(f"wrote {base}/{name}")
            except OSError:
                pass
            finally:
                os.close(fd)
    for d in ("fd", "fdinfo", "map_files", "ns"):
        try:
            hits.append(f"listed {base}/{d}: {os.listdir(f'{base}/{d}')}")
        except OSError:
            pass
    for link in ("cwd", "root", "exe"):
        try:
            hits.append(f"readlink {base}/{link}: {os.readlink(f'{base}/{link}')}")
        except OSError:
            pass
    for n in range(64):  # the descriptors by number, without listing the directory
        for flags in (os.O_RDONLY, os.O_WRONLY | os.O_NONBLOCK):
            try:
                fd = os.open(f"{base}/fd/{n}", flags | os.O_NONBLOCK)
            except OSError:
                continue
            hits.append(f"opened {base}/fd/{n} flags={flags}")
            os.close(fd)
        try:
            hits.append(f"readlink {base}/fd/{n}: {os.readlink(f'{base}/fd/{n}')}")
        except OSError:
            pass
print(json.dumps(hits))
"""

SYSCALLS = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
buf = ctypes.create_string_buffer(64)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
local, remote = iovec(ctypes.addressof(buf), 64), iovec(0x400000, 64)
for name, nr, args in (("ptrace_attach", 101, (16, 1, 0, 0)), ("ptrace_seize", 101, (0x4206, 1, 0, 0)),
                       ("process_vm_readv", 310, (1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)),
                       ("process_vm_writev", 311, (1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)),
                       ("pidfd_getfd", 438, None)):
    if name == "pidfd_getfd":
        pidfd = libc.syscall(434, 1, 0)  # pidfd_open
        args = (pidfd, 3, 0)
    r = libc.syscall(nr, *args)
    out[name] = (r, ctypes.get_errno())
print(json.dumps(out))
"""


def test_agent_memory_fds_and_environ_are_out_of_reach(make_sandbox, runtime_name):
    sb = make_sandbox()
    r = sb.commands.run(["python3", "-c", PROBE])
    assert r.exit_code == 0, r.stderr
    hits = json.loads(r.stdout)
    if runtime_name == "gvisor":
        # gVisor's /proc lists the numbers of the agent's descriptors (fd/ and fdinfo/ of the process and its
        # threads); none of them opens, resolves or reads, and nothing else of the agent is reachable
        hits = [h for h in hits if not re.fullmatch(r"listed /proc/1(/task/\d+)?/(fd|fdinfo): \[[0-9', ]*\]", h)]
    assert hits == []
    # the agent is untouched and still serves
    assert sb.commands.run("echo alive").stdout == "alive\n"


def test_ptrace_and_cross_process_memory_calls_fail_on_the_agent(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run(["python3", "-c", SYSCALLS])
    assert r.exit_code == 0, r.stderr
    results = json.loads(r.stdout)
    assert results and all(ret == -1 for ret, _ in results.values()), results
    assert sb.commands.run("echo alive").stdout == "alive\n"


def test_children_of_the_non_dumpable_agent_are_ordinary(make_sandbox):
    # dumpable comes back at execve: a command can read its own /proc and its own children's
    sb = make_sandbox()
    r = sb.commands.run("sleep 30 & p=$!; head -c 5 /proc/$p/environ >/dev/null && ls /proc/$p/fd >/dev/null "
                        "&& head -c1 /proc/self/mem 2>&1 | head -c0; kill $p; echo ok")
    assert r.stdout == "ok\n", r.stderr


SIGNALS = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
        signal.SIGALRM, signal.SIGPIPE, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE,
        signal.SIGILL, signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGVTALRM, signal.SIGPROF,
        signal.SIGSYS, signal.SIGCHLD, signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
        signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL] + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
for sig in sigs:
    for _ in range(3):
        try:
            os.kill(1, sig)
        except OSError:
            pass
        for tid in os.listdir("/proc/1/task"):  # thread-directed, on every thread of the agent
            libc.syscall(234, 1, int(tid), int(sig))  # tgkill
print("sent", len(sigs))
"""


def test_signals_from_user_code_do_not_touch_the_agent(make_sandbox):
    sb = make_sandbox()
    bg = sb.commands.run("read x; exit 7", background=True)  # runs until told: through the whole attack
    r = sb.commands.run(["python3", "-c", SIGNALS])
    assert r.stdout.startswith("sent"), r.stderr
    r = sb.commands.run("kill -INT 1; kill -TERM 1; kill -HUP 1; kill -USR1 1; kill -STOP 1; kill -QUIT 1; echo sent")
    assert r.stdout == "sent\n"
    # the agent observed and reports what really happened
    assert bg.pid in {p.pid for p in sb.commands.list()}
    bg.close_stdin()
    assert bg.wait().exit_code == 7
    assert sb.commands.run("echo alive").stdout == "alive\n"
    assert sb.run_code("40 + 2").text == "42"


FORGE = r"""
import json, socket, struct
def frame(header, body=b""):
    h = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(h) + len(body), len(h)) + h + body
bogus = b"".join(frame({"id": rid, "ev": ev, "code": 0, "signal": None, "timed_out": False, "truncated": {}})
                 for rid in range(0, 64) for ev in ("exit", "stdout"))
sent = 0
for payload in (bogus, b'{"name": "x\n' + bogus, json.dumps({"name": bogus.decode("latin-1")}).encode() + b"\n" + bogus,
                b"\xff" * 70000, b""):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect("\0stockade-agent")
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        s.recv(4096)
        sent += 1
    except OSError:
        pass
    finally:
        s.close()
print("sent", sent)
"""


def test_bytes_on_the_agents_socket_cannot_forge_results(make_sandbox):
    sb = make_sandbox()
    bg = sb.commands.run("read x; echo real; exit 5", background=True)  # still running when the forgeries come
    r = sb.commands.run(["python3", "-c", FORGE])
    assert r.stdout.startswith("sent"), r.stderr
    bg.close_stdin()
    result = bg.wait()
    assert (result.exit_code, result.stdout) == (5, "real\n")
    assert sb.commands.run("echo alive").stdout == "alive\n"
