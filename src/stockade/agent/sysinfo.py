"""sysinfo(2) answered with the sandbox's own figures, for a runtime whose kernel is the host's (the jail).

glibc's sysconf(_SC_PHYS_PAGES) and get_avphys_pages (Python's os.sysconf, gnulib's physmem in sort, the
sizing of many runtimes) read sysinfo(), and the host kernel answers it with the host's RAM, swap and
thread count whatever the sandbox's /proc/meminfo says. No file can mask a system call, so the agent
stacks a second seccomp filter (compiled on the host by libseccomp: sysinfo -> SECCOMP_RET_USER_NOTIF,
everything else allowed) over bwrap's before any user process exists, and answers each notification from
a thread of its own: the limits.memory the runtime gave, the swap the sandbox has (none), its own uptime
(the time namespace's) and process count, load 0 as /proc/loadavg shows.

The answer is written into the caller's buffer through /proc/PID/mem: the agent shares the caller's uid,
and the caller is its descendant, so it passes the ptrace access check (Yama's scope 1 included). A
process that made itself non-dumpable cannot be written to; it gets EPERM rather than the host's figures.
A thread, not the poll loop: the agent itself is under the filter, and a sysinfo() call on its own loop
(a library's) would then wait on itself forever.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import os
import time

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    from collections.abc import Callable

try:
    from .common import _errno_get, _libc_function
except ImportError:  # run as a script inside the sandbox
    from common import _errno_get, _libc_function  # type: ignore[no-redef]

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
# ioctls on the listener: _IOWR('!', 0, struct seccomp_notif [80]), _IOWR('!', 1, seccomp_notif_resp [24]),
# _IOW('!', 2, __u64)
NOTIF_RECV, NOTIF_SEND, NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
NOTIF_SIZE = 80
SYSINFO_SIZE = 112  # struct sysinfo on LP64 (x86_64, aarch64), padding included: what the kernel copies out


def _libc_syscall() -> Callable[..., int]:
    """syscall(2) taking and returning longs (a pointer and a descriptor do not fit the default int)."""
    import _ctypes

    class _Long(_ctypes._SimpleCData):  # type: ignore[name-defined]
        _type_ = "l"

    fn = _libc_function("syscall")
    fn.argtypes = (_Long,) * 4  # type: ignore[attr-defined]
    fn.restype = _Long  # type: ignore[attr-defined]
    return fn


def _buffer_address(data: bytes) -> tuple[object, int]:
    """A C copy of ``data`` and its address (the copy must outlive every use of the address)."""
    import _ctypes

    class _Char(_ctypes._SimpleCData):  # type: ignore[name-defined]
        _type_ = "c"

    class _Buf(_ctypes.Array):  # type: ignore[misc]
        _type_ = _Char
        _length_ = max(1, len(data))

    buf = _Buf.from_buffer_copy(data)
    return buf, _ctypes.addressof(buf)


def install(bpf: bytes, seccomp_nr: int, memory: int) -> None:
    """Load the filter over this process (every process it starts from now on inherits it) and answer
    its notifications from a new thread. Raises OSError if the kernel refuses (no user notification)."""
    prog, prog_addr = _buffer_address(bpf)
    # struct sock_fprog: unsigned short len (instructions of 8 bytes), padding, struct sock_filter *filter
    fprog, fprog_addr = _buffer_address((len(bpf) // 8).to_bytes(2, "little") + bytes(6)
                                        + prog_addr.to_bytes(8, "little"))
    syscall = _libc_syscall()
    listener = syscall(seccomp_nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, fprog_addr)
    del prog, fprog
    if listener < 0:
        err = _errno_get()
        raise OSError(err, f"seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER) failed: {os.strerror(err)}")
    os.set_inheritable(listener, False)
    _thread.start_new_thread(_serve, (listener, memory))


def answer(memory: int) -> bytes:
    """struct sysinfo as the sandbox sees itself (mem_unit 1: every size in bytes)."""
    boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # the time namespace's, as sysinfo() itself reports
    uptime = int(boot) + (1 if boot % 1 else 0)
    procs = sum(1 for name in os.listdir("/proc") if name.isdigit())
    longs = [uptime, 0, 0, 0, memory, memory, 0, 0, 0, 0]  # loads; total/free/shared/buffer ram; swap
    out = b"".join(v.to_bytes(8, "little", signed=True) for v in longs)
    out += min(procs, 0xFFFF).to_bytes(2, "little") + bytes(6)   # procs, pad, alignment
    out += bytes(16) + (1).to_bytes(4, "little")                  # totalhigh, freehigh; mem_unit
    return out.ljust(SYSINFO_SIZE, b"\0")


def _serve(listener: int, memory: int) -> None:
    while True:
        notif = bytearray(NOTIF_SIZE)  # the kernel requires it zeroed
        try:
            fcntl.ioctl(listener, NOTIF_RECV, notif, True)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ENOENT):  # a signal here, or the caller died meanwhile
                continue
            return  # the listener is gone: the agent is ending
        nid = bytes(notif[0:8])
        pid = int.from_bytes(notif[8:12], "little")
        buf = int.from_bytes(notif[32:40], "little")  # args[0]: the caller's struct sysinfo *
        error = _write_answer(listener, nid, pid, buf, memory)
        resp = bytearray(nid + bytes(8) + (-error).to_bytes(4, "little", signed=True) + bytes(4))
        try:
            fcntl.ioctl(listener, NOTIF_SEND, resp, True)
        except OSError:  # the caller was killed while it waited: nothing to answer
            pass


def _write_answer(listener: int, nid: bytes, pid: int, buf: int, memory: int) -> int:
    """0 once the caller's buffer holds the answer, else the errno its sysinfo() fails with. Never raises:
    the thread dying would leave every later caller waiting."""
    if buf >= 1 << 63:  # the kernel's half (and beyond what a file offset can say)
        return errno.EFAULT
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return errno.EPERM  # non-dumpable (or gone): never the host's figures
    try:
        # The pid is the caller's only while its notification is pending: checked after the open, so a
        # pid reused in between is never written to.
        fcntl.ioctl(listener, NOTIF_ID_VALID, bytearray(nid), True)
        data = answer(memory)
        return 0 if os.pwrite(fd, data, buf) == len(data) else errno.EFAULT
    except (OSError, ValueError, OverflowError):  # an address it cannot write (EIO); its call ended (ENOENT)
        return errno.EFAULT
    finally:
        os.close(fd)
