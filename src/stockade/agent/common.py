"""What every part of the agent shares: its limits, its error names and how it hardens itself."""

from __future__ import annotations

import _signal
import errno
import os
import select

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

try:
    from . import protocol
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]

HOME = "/home/user"  # the sandbox's home (the default cwd, where relative paths start); the hello may move it
OUT_HIGH_WATER = 4 << 20        # stop reading command output while this much waits for the host
STDIN_LIMIT = 8 << 20           # bytes of stdin buffered for one process
LIST_LIMIT = 10000              # entries returned by one list call
LIST_BYTES = protocol.MAX_HEADER // 2  # and their approximate encoded size
ARTIFACT_ADDRESS = b"\0stockade-agent"  # abstract: private to the sandbox's network namespace
MAX_ARTIFACT_CONNS = 16
CELL_EVENT_LIMIT = 32 << 20     # one result (an image, say) larger than this is dropped
INTERRUPT_GRACE = 2.0           # seconds a timed-out cell gets to honour KeyboardInterrupt
POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
KILL_ROUNDS = 100               # /proc rescans a tree kill makes before it gives up on stragglers
KILL_WAIT = 2.0                 # seconds a kill waits for what it SIGKILLed to die before it answers
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP = 4, 36, 24
# Ignored dispositions survive execve: a command gets these back at their defaults.
CHILD_DEFAULT_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGCHLD)


def _libc_prctl() -> Callable[..., int]:
    """prctl(2) through the C half of ctypes: the stdlib has no prctl, and ``import ctypes`` costs
    ~3.5 ms at every cold start where ``_ctypes`` alone costs ~0.7 ms (measured on python3.11)."""
    return _libc_function("prctl")


def _libc_function(name: str) -> Callable[..., int]:
    """A libc function, called with ints and bytes (a pointer to their buffer); errno kept for _errno_get."""
    import _ctypes

    class _Libc:
        _handle = _ctypes.dlopen(None)  # type: ignore[arg-type]  # the program and its libc

    class _Fn(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

    return _Fn((name, _Libc))  # type: ignore[arg-type]


def _harden(prctl: Callable[..., int]) -> None:
    """Before any user code runs. Non-dumpable: /proc/1/{mem,fd,environ,maps,...} and ptrace access to the
    agent need CAP_SYS_PTRACE over it, which nothing in the sandbox has (a child's execve makes it
    dumpable again). SIGINT ignored: the only signals user code can deliver to a PID namespace's init
    are those it handles, and Python handles SIGINT (KeyboardInterrupt would end the agent)."""
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(_errno_get(), "prctl(PR_SET_DUMPABLE) failed")
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)


def _errno_get() -> int:
    import _ctypes

    return int(_ctypes.get_errno())


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command name, the state first; None once the process is gone.
    "pid (comm) state ppid ...": comm may hold spaces and ')', so the fields start after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def _proc_stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, _proc_stat fields) of every process in the sandbox's PID namespace, skipping any that exit."""
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _proc_stat(name)) is not None:
            yield int(name), fields


def _read_some(fd: int) -> bytes | None:
    """What a non-blocking descriptor has: None if nothing yet, b"" at its end (or on an error)."""
    try:
        return os.read(fd, protocol.CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class AgentBase:
    """The agent's parts (processes, contexts, files, artifacts, the bridge) are mixins over this; the
    state is made in ``server.Agent.__init__``. Declared here for the type checker only: nothing of it
    exists at run time (TYPE_CHECKING is false in the sandbox)."""

    if TYPE_CHECKING:
        import socket

        from .contexts import Context
        from .ports import PortConn
        from .processes import Proc

        fd: int
        poll: select.poll
        out: bytearray
        procs: dict[int, Proc]
        by_fd: dict[int, Proc]
        stdin_fds: dict[int, Proc]
        reads: dict[int, list]
        writes: dict[int, list]
        failed_writes: set[int]
        env: dict[str, str]
        home: str
        user_uid: int | None
        paused: bool
        running: bool
        list_bytes: int
        contexts: dict[str, Context]
        listener: socket.socket | None
        artifact_rid: int
        art_conns: dict
        next_aid: int
        ctx_by_fd: dict[int, Context]
        nproc: int
        threads: int
        network_off: bool
        ports: dict[int, PortConn]
        port_fds: dict[int, PortConn]
        prctl: Callable[..., int]
        setrlimit: Callable[[int, tuple[int, int]], None] | None
        rlimit_nproc: int
        sig_r: int

        def send(self, header: dict, body: bytes = b"") -> None: ...
        def flush(self) -> None: ...
        def error(self, rid: int, code: str, message: str) -> None: ...
        # the processes of code contexts end through these (contexts.py)
        def context_died(self, ctx: Context) -> None: ...
        def context_timeout(self, ctx: Context) -> None: ...
        def drain_output(self, proc: Proc) -> None: ...
        def port_watch(self, conn: PortConn) -> None: ...
        def port_deadlines(self, now: float) -> None: ...

