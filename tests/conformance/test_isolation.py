"""Hostile code must not see or reach the host, nor another sandbox. Each test is what an attacker
would try first; each fails if the control it checks is removed."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from ..conftest import ROOT

# Python run inside the sandbox that calls a syscall through libc and prints its errno (0 = succeeded).
SYSCALL = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
nr = {nr}
args = [{args}]
r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
print(ctypes.get_errno() if r == -1 else 0)
"""
NR = {"mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "ptrace": 101, "unshare": 272,
      "setns": 308, "clone3": 435, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
      "userfaultfd": 323, "io_uring_setup": 425, "kexec_load": 246, "init_module": 175, "delete_module": 176,
      "process_vm_readv": 310, "open_by_handle_at": 304, "personality": 135, "acct": 163, "swapon": 167,
      "reboot": 169, "quotactl": 179}
EPERM, ENOSYS = 1, 38


def errno_of(sandbox, name: str, *args: int) -> int:
    code = SYSCALL.format(nr=NR[name], args=", ".join(str(a) for a in args))
    result = sandbox.commands.run(["python3", "-c", code])
    assert result.exit_code == 0, result.stderr
    return int(result.stdout.strip())


def status(sandbox) -> dict[str, str]:
    text = sandbox.commands.run("cat /proc/self/status").stdout  # the status of a user process
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_runs_as_unprivileged_user_with_no_capabilities(make_sandbox):
    sb = make_sandbox()
    assert sb.commands.run("id -u; id -g").stdout.split() == ["1000", "1000"]
    st = status(sb)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == 0, f"{field} = {st[field]}"
    assert st["NoNewPrivs"].strip() == "1"
    assert st["Seccomp"].strip() == "2"  # filter mode


@pytest.mark.parametrize("name,args", [
    ("mount", (0, 0, 0, 0, 0)), ("umount2", (0, 0)), ("pivot_root", (0, 0)), ("chroot", (0,)),
    ("ptrace", (16, 1, 0, 0)), ("unshare", (0x10000000,)), ("setns", (0, 0)), ("bpf", (0, 0, 0)),
    ("perf_event_open", (0, 0, -1, -1, 0)), ("keyctl", (0, 0)), ("add_key", (0, 0, 0, 0, 0)),
    ("userfaultfd", (0,)), ("io_uring_setup", (1, 0)), ("kexec_load", (0, 0, 0, 0)),
    ("init_module", (0, 0, 0)), ("delete_module", (0, 0)), ("process_vm_readv", (1, 0, 0, 0, 0, 0)),
    ("open_by_handle_at", (0, 0, 0)), ("personality", (0x0040000,)), ("acct", (0,)), ("swapon", (0, 0)),
    ("reboot", (0, 0, 0, 0)), ("quotactl", (0, 0, 0, 0)),
])
def test_dangerous_syscalls_fail_with_eperm(make_sandbox, name, args):
    assert errno_of(make_sandbox(), name, *args) == EPERM


def test_clone3_is_unavailable_and_clone_cannot_make_namespaces(make_sandbox):
    sb = make_sandbox()
    assert errno_of(sb, "clone3", 0, 0) == ENOSYS  # libc falls back to clone(), whose flags are checked
    for tool in ("unshare --user true", "unshare --net true", "unshare --mount true"):
        r = sb.commands.run(tool)
        assert r.exit_code != 0, f"{tool} succeeded"
    # plain fork still works
    assert sb.commands.run("sh -c 'echo child & wait'").stdout == "child\n"


def test_socket_families_outside_unix_and_inet_are_refused(make_sandbox):
    code = """
import socket, errno
out = []
for fam in (socket.AF_NETLINK, socket.AF_PACKET, 4, 5, 9, 38, 40):  # netlink, packet, ipx, appletalk, x25, alg, vsock
    try:
        socket.socket(fam, socket.SOCK_DGRAM if fam != socket.AF_PACKET else socket.SOCK_RAW)
        out.append("open")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    socket.socket(fam, socket.SOCK_STREAM).close()
print(" ".join(out))
"""
    r = make_sandbox().commands.run(["python3", "-c", code])
    assert r.exit_code == 0, r.stderr
    assert set(r.stdout.split()) == {"EPERM"}


def test_terminal_injection_ioctl_is_refused(make_sandbox):
    code = """
import fcntl, os, errno, termios
m, s = os.openpty()
try:
    fcntl.ioctl(s, termios.TIOCSTI, b"x")
    print("allowed")
except OSError as e:
    print(errno.errorcode[e.errno])
"""
    assert make_sandbox().commands.run(["python3", "-c", code]).stdout.strip() == "EPERM"


def test_root_filesystem_is_read_only_and_minimal(make_sandbox):
    sb = make_sandbox()
    for path in ("/usr/bin/evil", "/etc/evil", "/evil", "/bin/evil", "/opt/stockade/agent/x"):
        r = sb.commands.run(f"echo x > {path}")
        assert r.exit_code != 0, f"wrote {path}"
    listing = sb.commands.run("ls -a /").stdout.split()
    for host_only in ("root", "var", "run", "srv", "mnt", "media", "boot", "sys", "work"):
        assert host_only not in listing
    assert sb.commands.run("ls /home").stdout.split() == ["user"]
    assert not sb.files.exists("/etc/shadow")
    assert "user:x:1000:1000" in sb.files.read("/etc/passwd")
    assert sb.commands.run("ls /dev").stdout.split() == sorted(
        ["core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
         "urandom", "zero"])


def test_host_files_are_invisible(make_sandbox, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-HOST-DATA")
    sb = make_sandbox()
    r = sb.commands.run(f"cat {secret}; ls {tmp_path}; grep -r TOP-SECRET-HOST-DATA /tmp /home 2>/dev/null")
    assert "TOP-SECRET-HOST-DATA" not in r.stdout
    assert not sb.files.exists(str(secret))
    # the host's /etc is not bound wholesale: only an allowlist of files
    assert not sb.files.exists("/etc/machine-id")
    assert sb.files.read("/etc/hostname").strip() == "sandbox"


def test_host_processes_are_invisible(make_sandbox):
    sb = make_sandbox()
    pids = [int(p) for p in sb.commands.run("ls /proc").stdout.split() if p.isdigit()]
    # only the agent (pid 1), the shell and ls: nothing of the host
    assert max(pids) < 10 and 1 in pids
    assert str(os.getpid()) not in sb.commands.run("cat /proc/*/status 2>/dev/null | grep ^Pid").stdout.split()


def test_host_loopback_and_abstract_sockets_are_unreachable(make_sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0stockade-test-abstract")
    abstract.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        code = f"""
import socket
for target in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_UNIX, b"\\0stockade-test-abstract"),
               (socket.AF_INET, ("10.0.2.2", 80))]:
    s = socket.socket(target[0]); s.settimeout(2)
    try:
        s.connect(target[1]); print("connected")
    except OSError as e:
        print("refused")
"""
        r = make_sandbox().commands.run(["python3", "-c", code])
        assert r.stdout.split() == ["refused"] * 3, r.stderr
        assert not accepted
        ifaces = make_sandbox().commands.run("cat /proc/net/dev").stdout
        assert [line.split(":")[0].strip() for line in ifaces.splitlines()[2:]] == ["lo"]
    finally:
        listener.close()
        abstract.close()


def test_dns_does_not_resolve(make_sandbox):
    code = """
import socket
try:
    socket.getaddrinfo("example.invalid", 80); print("resolved")
except OSError:
    print("no-dns")
"""
    assert make_sandbox().commands.run(["python3", "-c", code]).stdout.strip() == "no-dns"


def test_sandboxes_cannot_see_or_reach_each_other(make_sandbox):
    a, b = make_sandbox(), make_sandbox()
    a.files.write("/tmp/mine", "A-ONLY")
    a.commands.run("python3 -c \"import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 45678)); "
                   "s.listen(); time.sleep(30)\"", background=True)
    assert not b.files.exists("/tmp/mine")
    code = """
import socket
s = socket.socket(); s.settimeout(2)
try:
    s.connect(("127.0.0.1", 45678)); print("connected")
except OSError:
    print("refused")
"""
    assert b.commands.run(["python3", "-c", code]).stdout.strip() == "refused"
    assert "time.sleep" not in b.commands.run("cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '").stdout


@pytest.mark.skipif(not ROOT, reason="per-sandbox host uids exist only when stockade runs as root")
def test_each_sandbox_has_its_own_unprivileged_host_uid(make_sandbox):
    infos = [make_sandbox().info().runtime for _ in range(3)]
    uids = {i["host_uid"] for i in infos}
    assert len(uids) == 3
    assert all(i["uid_isolation"] for i in infos)
    assert 0 not in uids and os.getuid() not in uids
    for info in infos:  # the agent process on the host really runs as that uid
        assert os.stat(f"/proc/{info['agent_host_pid']}").st_uid == info["host_uid"]


def test_environment_of_the_host_does_not_leak(make_sandbox, monkeypatch):
    monkeypatch.setenv("STOCKADE_TEST_HOST_SECRET", "leak-me")
    env = make_sandbox().commands.run("env").stdout
    assert "leak-me" not in env
    assert "HOME=/home/user" in env.splitlines()


def test_agent_cannot_be_killed_from_inside(make_sandbox):
    sb = make_sandbox()
    sb.commands.run("kill -9 1; kill -9 -1")
    assert sb.commands.run("echo alive").stdout == "alive\n"


def test_policy_mounts_expose_only_the_named_host_path(make_sandbox, shared_dir: Path):
    shared = shared_dir / "in"
    shared.mkdir()
    (shared / "data.txt").write_text("input")
    (shared_dir / "beside.txt").write_text("not shared")
    sb = make_sandbox(filesystem={"mounts": [{"source": str(shared), "target": "/mnt/in", "mode": "ro"}]})
    assert sb.files.read("/mnt/in/data.txt") == "input"
    assert sb.commands.run("echo x > /mnt/in/new").exit_code != 0
    assert sb.commands.run("ls /mnt").stdout.split() == ["in"]
    assert not (shared / "new").exists()


def test_commands_inherit_no_descriptor_of_the_agent(make_sandbox):
    code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    # 0-2 and the descriptor listdir itself opened
    assert make_sandbox().commands.run(["python3", "-c", code]).stdout.strip() == "[0, 1, 2, 3]"


def test_setuid_binaries_and_kernel_knobs_grant_nothing(make_sandbox):
    sb = make_sandbox()
    r = sb.commands.run("ls -l /usr/bin/su /usr/bin/passwd 2>/dev/null | head -1; su -c id root </dev/null; "
                        "echo rc=$?")
    assert "rc=0" not in r.stdout
    for knob in ("/proc/sys/kernel/hostname", "/proc/sysrq-trigger", "/proc/sys/vm/drop_caches"):
        r = sb.commands.run(f"echo 1 > {knob}")
        assert r.exit_code != 0, f"wrote {knob}"
    assert sb.commands.run("hostname evil").exit_code != 0
    assert sb.commands.run("hostname").stdout == "sandbox\n"
