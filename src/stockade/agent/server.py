"""The agent: the sandbox's init process, and the only thing in it the host talks to.

Started by the runtime as PID 1 of the sandbox's PID namespace with the host channel's fd in argv[1]. One
thread, one poll loop: it reads requests from the host, forks and reaps every process in the sandbox
(orphans included, as an init must), streams their output back, and serves file operations. Paths
are resolved here, inside the sandbox; the host never opens a path it was given.

One module per concern, each a mixin of ``Agent`` (``sysinfo`` apart: the jail's sysinfo() answers):
``processes`` (spawn, output, stdin, signals, reaping, tree kills), ``contexts`` (code interpreters),
``files``, ``artifacts`` (the artifact socket), ``bridge`` (the proxy ports), ``ports`` (the host's
connections to ports inside), ``usage`` (what the sandbox uses); ``common`` holds the limits and the
hardening. Standard library only, and only modules built into the interpreter, so a cold start stays cheap.
Compatible with the python3 of current Debian and Ubuntu releases.
"""

from __future__ import annotations

import _signal
import errno
import os
import select
import sys

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from .processes import Proc

try:
    from . import protocol
    from . import sysinfo as sysinfo_answers
    from .artifacts import ArtifactSink
    from .bridge import Bridge
    from .common import HOME, OUT_HIGH_WATER, POLL_IN, PR_CAPBSET_DROP, _errno_get, _errno_name, _harden, _libc_prctl
    from .contexts import Contexts
    from .files import Files
    from .ports import Ports
    from .usage import Usage
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]
    import sysinfo as sysinfo_answers  # type: ignore[no-redef,import-not-found]
    from artifacts import ArtifactSink  # type: ignore[no-redef]
    from bridge import Bridge  # type: ignore[no-redef]
    from common import HOME, OUT_HIGH_WATER, POLL_IN, PR_CAPBSET_DROP, _errno_get, _errno_name, _harden, _libc_prctl  # type: ignore[no-redef]
    from contexts import Contexts  # type: ignore[no-redef]
    from files import Files  # type: ignore[no-redef]
    from ports import Ports  # type: ignore[no-redef,import-not-found]
    from usage import Usage  # type: ignore[no-redef,import-not-found]


class Agent(Contexts, Files, ArtifactSink, Bridge, Ports, Usage):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)  # bwrap handed it over inheritable: no child may get it
        self.poll = select.poll()
        self.poll.register(fd, POLL_IN)
        self.out = bytearray()
        self.decoder = protocol.FrameDecoder()
        self.procs: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.stdin_fds: dict[int, Proc] = {}
        self.reads: dict[int, list] = {}       # rid -> [fd, credit]
        self.writes: dict[int, list] = {}      # rid -> [fd, size]
        self.failed_writes: set[int] = set()
        self.env: dict[str, str] = {}
        self.home = HOME                       # the default cwd, where relative paths start
        self.paused = False
        self.running = True
        self.list_bytes = 0
        self.contexts: dict = {}               # context id -> Context
        self.listener: socket.socket | None = None  # the artifact socket, once the host opens artifacts
        self.artifact_rid = 0
        self.art_conns: dict = {}              # fd -> an artifact being received from a process
        self.next_aid = 0
        self.ctx_by_fd: dict = {}              # events fd -> Context
        self.nproc = 0                         # RLIMIT_NPROC of user processes (0: not set)
        self.user_uid: int | None = None       # set: the agent keeps real uid 0 and commands become this
        self.threads = 1                       # the agent's own tasks, which count against it too
        self.network_off = False               # the refusing proxy ports listen (op net_off)
        self.ports: dict = {}                  # rid -> PortConn: connections to ports inside (ports.py)
        self.port_fds: dict = {}               # fd -> PortConn
        self.prctl = _libc_prctl()
        self.setrlimit: Callable[[int, tuple[int, int]], None] | None = None  # resource's, imported at hello
        self.rlimit_nproc = 0
        _harden(self.prctl)
        # SIGCHLD wakes the loop through a pipe; the handler itself does nothing.
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        self.poll.register(self.sig_r, select.POLLIN)

    # ---- output to the host ------------------------------------------------------------------
    def send(self, header: dict, body: bytes = b"") -> None:
        self.out += protocol.encode(header, body)
        self.flush()

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out)
            except BlockingIOError:
                break
            except OSError:  # host gone: nothing left to serve
                self.running = False
                self.out.clear()
                return
            del self.out[:n]
        self.poll.modify(self.fd, POLL_IN | (select.POLLOUT if self.out else 0))
        paused = len(self.out) > OUT_HIGH_WATER
        if paused != self.paused:
            self.paused = paused
            readers = list(self.by_fd) + [fd for fd, c in self.art_conns.items() if not c.get("done")]
            for pfd in readers:
                if paused:
                    self.poll.unregister(pfd)
                else:
                    self.poll.register(pfd, POLL_IN)
            for conn in list(self.ports.values()):
                self.port_watch(conn)

    def error(self, rid: int, code: str, message: str) -> None:
        self.send({"id": rid, "ev": "error", "code": code, "message": message})

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        while self.running:
            timeout = self.next_timeout()
            try:
                events = self.poll.poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self.fd:
                    if ev & select.POLLOUT:
                        self.flush()
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self.read_host()
                elif fd == self.sig_r:
                    self.reap()
                elif fd in self.by_fd:
                    self.read_output(fd)
                elif fd in self.stdin_fds:
                    self.write_stdin(self.stdin_fds[fd])
                elif fd in self.ctx_by_fd:
                    self.read_events(self.ctx_by_fd[fd])
                elif fd in self.port_fds:
                    self.port_ready(self.port_fds[fd], ev)
                elif fd in self.art_conns:
                    self.read_artifact(fd)
                elif self.listener is not None and fd == self.listener.fileno():
                    self.accept_artifact()
            self.check_deadlines()
            self.pump_reads()

    def read_host(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # host closed the channel: the sandbox is over
            self.running = False
            return
        for header, body in self.decoder.feed(data):
            self.dispatch(header, body)

    def dispatch(self, h: dict, body: bytes) -> None:
        op, rid = h.get("op"), h.get("id", 0)
        handler = getattr(self, "op_" + op, None) if isinstance(op, str) else None
        if handler is None:
            self.error(rid, "EINVAL", f"unknown operation {op!r}")
            return
        try:
            handler(rid, h, body)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            self.error(rid, _errno_name(exc), f"{exc.strerror or exc}{where}")
        except (KeyError, TypeError, ValueError) as exc:
            self.error(rid, "EINVAL", f"bad request: {exc}")

    # ---- session -------------------------------------------------------------------------------
    def op_hello(self, rid: int, h: dict, body: bytes) -> None:
        import binascii
        import resource

        if h.get("user") is not None:
            self.become(int(h["user"][0]), int(h["user"][1]))
        self.home = h.get("home") or self.home  # the runtime's layout says where it is
        if h.get("workspace"):
            _place(h["workspace"])
        self.env = dict(h["env"])
        for name, value in h["rlimits"].items():
            res = getattr(resource, "RLIMIT_" + name.upper())
            resource.setrlimit(res, (int(value), int(value)))
        # Not the agent's own limit: each child lowers it before exec, so user code cannot take the
        # pids the host left above limits.pids for the agent (counted per uid per user namespace).
        self.nproc = int(h.get("nproc") or 0)
        if h.get("sysinfo"):  # the host's kernel would answer sysinfo() with the host's figures
            sysinfo_answers.install(binascii.a2b_base64(h["sysinfo"]["filter"]), int(h["sysinfo"]["seccomp_nr"]),
                                    int(h["sysinfo"]["memory"]))
            self.threads += 1
        self.setrlimit = resource.setrlimit
        self.rlimit_nproc = resource.RLIMIT_NPROC
        # Nothing of the host may leak into the sandbox through inherited descriptors: stderr
        # carried bwrap's start-up errors and is swapped for /dev/null now that start-up is over.
        null = os.open("/dev/null", os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        self.send({"id": rid, "ev": "ready", "v": protocol.VERSION, "pid": os.getpid()})

    def become(self, uid: int, gid: int) -> None:
        """For a runtime whose kernel does not shield a namespace's init from its own processes' signals
        (gVisor delivers `kill -9 1`): the agent starts as root of the sandbox with CAP_SETUID, CAP_SETGID
        and CAP_SETPCAP only, empties the bounding set, and keeps real and saved uid 0 under effective uid
        ``uid``. It acts on files as ``uid`` (the effective ids), while user code, all of whose ids are
        ``uid`` (each child sets them before exec, which clears every capability), can neither signal nor
        trace it: both need the sender's uid to match the agent's real or saved one."""
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        for cap in range(64):
            # EINVAL: a capability this kernel does not know (41+ on Linux 6.x)
            if self.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and _errno_get() != errno.EINVAL:
                raise OSError(_errno_get(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")
        with open("/proc/self/status") as f:  # and nothing it knows is left
            bounding = next((line.split()[1] for line in f if line.startswith("CapBnd:")), None)
        if bounding is not None and int(bounding, 16) != 0:
            raise OSError(errno.EPERM, f"the bounding set is {bounding} after dropping every capability")
        os.setresuid(0, uid, 0)
        self.user_uid = uid

    def op_setenv(self, rid: int, h: dict, body: bytes) -> None:
        """More variables for everything started from now on (a warm sandbox gets its caller's here)."""
        self.env.update({str(k): str(v) for k, v in h["env"].items()})
        self.send({"id": rid, "ev": "ok"})


def _place(tree: dict) -> None:
    """Files the runtime could not place before the start (its workspace is a tmpfs the agent's kernel
    makes, gVisor's): directories, symlinks, then files, as the agent's effective user."""
    import binascii

    for d in tree.get("dirs", ()):
        os.makedirs(d, 0o755, exist_ok=True)
    for target, path in tree.get("symlinks", ()):
        os.symlink(target, path)
    for path, data, mode in tree.get("files", ()):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, int(mode))
        try:
            os.write(fd, binascii.a2b_base64(data))
        finally:
            os.close(fd)
        os.chmod(path, int(mode))  # the umask may have taken bits the runtime asked for


def main() -> None:
    fd = int(sys.argv[1])
    if fd < 3:  # the channel came as stdio (runsc hands the container its own), which is reset to
        import fcntl  # /dev/null at ready: keep the channel above it

        fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    Agent(fd).run()


if __name__ == "__main__":
    main()
