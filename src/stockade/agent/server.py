"""The agent: the sandbox's init process, and the only thing in it the host talks to.

Started by the runtime as PID 1 of the sandbox's PID namespace with the host channel's fd in argv[1]. One
thread, one poll loop: it reads requests from the host, forks and reaps every process in the sandbox
(orphans included, as an init must), streams their output back, and serves file operations. Paths
are resolved here, inside the sandbox; the host never opens a path it was given.

Standard library only, and only modules built into the interpreter, so a cold start stays cheap.
Compatible with the python3 of current Debian and Ubuntu releases.
"""

from __future__ import annotations

import _signal
import errno
import os
import select
import sys
from time import monotonic as _monotonic
from time import sleep as _sleep

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    from collections.abc import Callable

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
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
# Ignored dispositions survive execve: a command gets these back at their defaults.
CHILD_DEFAULT_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGCHLD)


def _libc_prctl() -> Callable[..., int]:
    """prctl(2) through the C half of ctypes: the stdlib has no prctl, and ``import ctypes`` costs
    ~3.5 ms at every cold start where ``_ctypes`` alone costs ~0.7 ms (measured on python3.11)."""
    import _ctypes

    class _Libc:
        _handle = _ctypes.dlopen(None)  # type: ignore[arg-type]  # the program and its libc

    class _Fn(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

    return _Fn(("prctl", _Libc))  # type: ignore[arg-type]


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


class Proc:
    __slots__ = ("pid", "rid", "cmd", "tag", "fds", "stdin_fd", "stdin_buf", "stdin_eof", "limit",
                 "sent", "truncated", "status", "deadline", "timed_out")

    def __init__(self, pid: int, rid: int, cmd: str, tag: str | None, limit: int) -> None:
        self.pid, self.rid, self.cmd, self.tag, self.limit = pid, rid, cmd, tag, limit
        self.fds: dict[int, str] = {}         # open output pipe fd -> "stdout" | "stderr"
        self.stdin_fd: int | None = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.sent = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.status: int | None = None
        self.deadline: float | None = None
        self.timed_out = False


class Context:
    """A code-interpreter process and the cell it is running (``current``: the request id)."""

    def __init__(self, ctx_id: str, proc: Proc, fd: int) -> None:
        self.id, self.proc, self.fd = ctx_id, proc, fd
        self.buf = bytearray()
        self.dropping = False
        self.current: int | None = None
        self.deadline: float | None = None
        self.interrupted = False
        self.backend = ""


class Agent:
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
        self.paused = False
        self.running = True
        self.list_bytes = 0
        self.contexts: dict = {}               # context id -> Context
        self.listener = None                   # the artifact socket, once the host opens artifacts
        self.artifact_rid = 0
        self.art_conns: dict = {}              # fd -> an artifact being received from a process
        self.next_aid = 0
        self.ctx_by_fd: dict = {}              # events fd -> Context
        self.nproc = 0                         # RLIMIT_NPROC of user processes (0: not set)
        self.threads = 1                       # the agent's own tasks, which count against it too
        self.network_off = False               # the refusing proxy ports listen (op net_off)
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
        import resource

        global HOME
        HOME = h.get("home") or HOME  # the runtime's layout says where it is
        self.env = dict(h["env"])
        for name, value in h["rlimits"].items():
            res = getattr(resource, "RLIMIT_" + name.upper())
            resource.setrlimit(res, (int(value), int(value)))
        # Not the agent's own limit: each child lowers it before exec, so user code cannot take the
        # pids the host left above limits.pids for the agent (counted per uid per user namespace).
        self.nproc = int(h.get("nproc") or 0)
        self.setrlimit = resource.setrlimit
        self.rlimit_nproc = resource.RLIMIT_NPROC
        # Nothing of the host may leak into the sandbox through inherited descriptors: stderr
        # carried bwrap's start-up errors and is swapped for /dev/null now that start-up is over.
        null = os.open("/dev/null", os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        self.send({"id": rid, "ev": "ready", "v": protocol.VERSION, "pid": os.getpid()})

    # ---- processes -----------------------------------------------------------------------------
    def op_setenv(self, rid: int, h: dict, body: bytes) -> None:
        """More variables for everything started from now on (a warm sandbox gets its caller's here)."""
        self.env.update({str(k): str(v) for k, v in h["env"].items()})
        self.send({"id": rid, "ev": "ok"})

    def op_exec(self, rid: int, h: dict, body: bytes) -> None:
        argv = h.get("argv")
        if argv is None:
            argv = ["/bin/sh", "-c", h["cmd"]]
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = dict(self.env)
        env.update(h.get("env") or {})
        cwd = h.get("cwd") or HOME
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        proc = Proc(0, rid, h.get("cmd") or " ".join(argv), h.get("tag"), int(h["limit"]))
        try:
            pid = self.spawn(argv, env, cwd, in_r, out_w, err_w)
        except OSError as exc:
            for fd in (out_r, err_r, in_w):
                os.close(fd)
            what = f"cannot enter {cwd!r}" if exc.filename == cwd else f"cannot run {argv[0]!r}"
            self.send({"id": rid, "ev": "started", "pid": 0})
            self.send({"id": rid, "ev": "stderr"}, f"stockade: {what}: {exc.strerror or exc}\n".encode())
            self.send({"id": rid, "ev": "exit", "code": 127, "signal": None, "timed_out": False,
                       "truncated": proc.truncated})
            return
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
        proc.pid = pid
        self.attach(proc, out_r, err_r, in_w)
        proc.stdin_buf += body
        proc.stdin_eof = not h.get("stdin_open", False)
        timeout = h.get("timeout")
        if timeout:
            proc.deadline = _monotonic() + float(timeout)
        self.procs[pid] = proc
        self.send({"id": rid, "ev": "started", "pid": pid})
        self.write_stdin(proc)

    def attach(self, proc: Proc, out_r: int, err_r: int, in_w: int) -> None:
        for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
            os.set_blocking(fd, False)
            proc.fds[fd] = name
            self.by_fd[fd] = proc
            if not self.paused:
                self.poll.register(fd, POLL_IN)
        os.set_blocking(in_w, False)
        proc.stdin_fd = in_w

    def spawn(self, argv: list, env: dict, cwd: str, stdin: int, stdout: int, stderr: int, events: int = -1) -> int:
        """fork + exec in a new session with default signal handling. Every descriptor of the agent is
        close-on-exec, so the child gets only 0-2 (and 3 for a code-interpreter context's events).
        fork, not posix_spawn: the child must make itself a child subreaper (kept across execve), so
        every orphan of the command reparents to the command's top process and a kill finds the whole
        tree (setsid, setpgid and double forks included), and lower RLIMIT_NPROC."""
        program = _which(argv[0], env.get("PATH", ""))
        fds = (stdin, stdout, stderr) + ((events,) if events >= 0 else ())
        nproc = self.nproc + self.threads if self.nproc else 0
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: nothing here may return into the agent's loop
            step = b"setup"
            try:
                for sig in CHILD_DEFAULT_SIGNALS:
                    _signal.signal(sig, _signal.SIG_DFL)
                os.setsid()
                self.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                if nproc and self.setrlimit is not None:
                    self.setrlimit(self.rlimit_nproc, (nproc, nproc))
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.set_inheritable(target, True)
                try:  # user code, not the agent, is what the OOM killer should pick first
                    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                    os.write(fd, b"1000")
                    os.close(fd)
                except OSError:
                    pass
                step = b"chdir"
                os.chdir(cwd)
                step = b"exec"
                os.execve(program, argv, env)
            except OSError as exc:
                os.write(err_w, step + b":" + str(exc.errno or errno.EIO).encode())
            finally:
                os._exit(127)
        os.close(err_w)
        try:
            failure = os.read(err_r, 64)  # empty once the exec closed it
        finally:
            os.close(err_r)
        if failure:
            os.waitpid(pid, 0)
            step, _, num = failure.partition(b":")
            code = int(num)
            raise OSError(code, os.strerror(code), cwd if step == b"chdir" else program)
        return pid

    def read_output(self, fd: int) -> None:
        proc = self.by_fd[fd]
        data = _read_some(fd)
        if data is None:
            return
        if not data:
            self.close_output(fd)
            self.maybe_finish(proc)
            return
        self.forward(proc, proc.fds[fd], data)

    def forward(self, proc: Proc, stream: str, data: bytes) -> None:
        room = proc.limit - proc.sent[stream]
        if len(data) > room:
            proc.truncated[stream] = True
            data = data[:max(room, 0)]
        if data:
            proc.sent[stream] += len(data)
            self.send({"id": proc.rid, "ev": stream}, data)

    def close_output(self, fd: int) -> None:
        proc = self.by_fd.pop(fd)
        del proc.fds[fd]
        if not self.paused:
            self.poll.unregister(fd)
        os.close(fd)

    def write_stdin(self, proc: Proc) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf)
            except BlockingIOError:
                break
            except OSError:  # reader gone: drop what it will never read
                proc.stdin_buf.clear()
                proc.stdin_eof = True
                break
            del proc.stdin_buf[:n]
        watching = fd in self.stdin_fds
        if proc.stdin_buf and not watching:
            self.stdin_fds[fd] = proc
            self.poll.register(fd, select.POLLOUT)
        elif not proc.stdin_buf and watching:
            del self.stdin_fds[fd]
            self.poll.unregister(fd)
        if not proc.stdin_buf and proc.stdin_eof:
            os.close(fd)
            proc.stdin_fd = None

    def op_stdin(self, rid: int, h: dict, body: bytes) -> None:
        proc = self.procs.get(h["pid"])
        if proc is None or proc.stdin_fd is None:
            self.error(rid, "ESRCH", f"process {h['pid']} is not running or its stdin is closed")
            return
        if len(proc.stdin_buf) + len(body) > STDIN_LIMIT:
            self.error(rid, "ENOBUFS", "the process is not reading its stdin; buffer is full")
            return
        proc.stdin_buf += body
        proc.stdin_eof = proc.stdin_eof or bool(h.get("eof"))
        self.write_stdin(proc)
        if rid:
            self.send({"id": rid, "ev": "ok"})

    def op_signal(self, rid: int, h: dict, body: bytes) -> None:
        pid, sig = h["pid"], int(h["sig"])
        if pid not in self.procs:
            self.error(rid, "ESRCH", f"no process {pid} started by the agent is running")
            return
        if sig == _signal.SIGKILL:  # a kill ends everything the command started, wherever it went
            _kill_tree(pid)
        else:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                os.kill(pid, sig)
        self.send({"id": rid, "ev": "ok"})

    def op_kill_all(self, rid: int, h: dict, body: bytes) -> None:
        """Every process in the sandbox but the agent: commands, what they left running, contexts."""
        me = os.getpid()
        killed = _stop_then_kill(lambda: {pid for pid in _parents() if pid != me})
        for ctx in list(self.contexts.values()):  # gone before the answer: the next cell starts afresh
            try:
                os.waitid(os.P_PID, ctx.proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        self.reap()
        self.send({"id": rid, "ev": "result", "killed": killed})

    def op_ps(self, rid: int, h: dict, body: bytes) -> None:
        procs = [{"pid": p.pid, "cmd": p.cmd, "tag": p.tag} for p in self.procs.values() if p.status is None]
        self.send({"id": rid, "ev": "result", "procs": procs})

    def reap(self) -> None:
        try:
            while os.read(self.sig_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is not None:  # anything else was an orphan we inherited as init
                proc.status = status
                self.maybe_finish(proc, draining=True)
            for ctx in list(self.contexts.values()):
                if ctx.proc.pid == pid:
                    self.context_died(ctx)

    def maybe_finish(self, proc: Proc, draining: bool = False) -> None:
        if proc.status is None:
            return
        if draining:
            # What the process wrote before it exited is already in the pipes; a background
            # grandchild holding them open must not keep the command from completing.
            self.drain_output(proc)
            for fd in list(proc.fds):
                self.close_output(fd)
        elif proc.fds:
            return
        if proc.stdin_fd is not None:
            if self.stdin_fds.pop(proc.stdin_fd, None):
                self.poll.unregister(proc.stdin_fd)
            os.close(proc.stdin_fd)
            proc.stdin_fd = None
        del self.procs[proc.pid]
        status = proc.status
        self.send({"id": proc.rid, "ev": "exit",
                   "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                   "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                   "timed_out": proc.timed_out, "truncated": proc.truncated})

    def next_timeout(self) -> int:
        deadlines = [p.deadline for p in self.procs.values() if p.deadline and not p.timed_out]
        deadlines += [c.deadline for c in self.contexts.values() if c.deadline]
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - _monotonic()) * 1000) + 1)

    def check_deadlines(self) -> None:
        now = _monotonic()
        for ctx in list(self.contexts.values()):
            if ctx.deadline and now >= ctx.deadline:
                self.context_timeout(ctx)
        for proc in list(self.procs.values()):
            if proc.deadline and not proc.timed_out and now >= proc.deadline:
                proc.timed_out = True
                _kill_tree(proc.pid)

    # ---- code-interpreter contexts --------------------------------------------------------------
    def op_ctx_start(self, rid: int, h: dict, body: bytes) -> None:
        ctx_id = h["ctx"]
        if not isinstance(ctx_id, str) or ctx_id in self.contexts:
            raise ValueError(f"context {ctx_id!r} exists or is not a string")
        here = os.path.dirname(os.path.abspath(__file__))
        language = h["language"]
        if language == "javascript":
            argv = ["node", os.path.join(here, "interpreter.js")]
        else:
            argv = [h["python"], os.path.join(here, "interpreter.pyc")] + (["--bash"] if language == "bash" else [])
        env = dict(self.env)
        env.update(h.get("env") or {})
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        ev_r, ev_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.spawn(argv, env, h.get("cwd") or HOME, in_r, out_w, err_w, ev_w)
        except OSError:
            for fd in (out_r, err_r, in_w, ev_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r, ev_w):
                os.close(fd)
        proc = Proc(pid, rid, "code interpreter", "context:" + ctx_id, int(h["limit"]))
        self.attach(proc, out_r, err_r, in_w)
        os.set_blocking(ev_r, False)
        ctx = Context(ctx_id, proc, ev_r)
        ctx.current = rid
        ctx.deadline = _monotonic() + float(h.get("timeout") or 60)
        self.contexts[ctx_id] = ctx
        self.ctx_by_fd[ev_r] = ctx
        self.poll.register(ev_r, POLL_IN)

    def op_ctx_run(self, rid: int, h: dict, body: bytes) -> None:
        ctx = self.contexts.get(h["ctx"])
        if ctx is None:
            self.error(rid, "ESRCH", f"context {h['ctx']!r} is not running")
            return
        if ctx.current is not None:
            self.error(rid, "EBUSY", f"context {h['ctx']!r} is running another cell")
            return
        proc = ctx.proc
        proc.rid, proc.limit = rid, int(h["limit"])
        proc.sent = {"stdout": 0, "stderr": 0}
        proc.truncated = {"stdout": False, "stderr": False}
        ctx.current, ctx.interrupted = rid, False
        timeout = h.get("timeout")
        ctx.deadline = _monotonic() + float(timeout) if timeout else None
        request = protocol.dumps({"code": h["code"], "env": h.get("env") or {}}) + "\n"
        proc.stdin_buf += request.encode()
        self.write_stdin(proc)

    def op_ctx_stop(self, rid: int, h: dict, body: bytes) -> None:
        ctx = self.contexts.get(h["ctx"])
        if ctx is not None:
            _kill_tree(ctx.proc.pid)
        self.send({"id": rid, "ev": "ok"})

    def op_ctx_list(self, rid: int, h: dict, body: bytes) -> None:
        self.send({"id": rid, "ev": "result", "contexts": sorted(self.contexts)})

    def read_events(self, ctx: Context) -> None:
        data = _read_some(ctx.fd)
        if data is None:
            return
        if not data:
            self.poll.unregister(ctx.fd)
            del self.ctx_by_fd[ctx.fd]
            os.close(ctx.fd)
            ctx.fd = -1
            return
        ctx.buf += data
        while b"\n" in ctx.buf:
            line, _, rest = bytes(ctx.buf).partition(b"\n")
            ctx.buf = bytearray(rest)
            self.context_event(ctx, line)
        if len(ctx.buf) > CELL_EVENT_LIMIT:  # one event larger than any result we pass on: drop it
            ctx.buf.clear()
            ctx.dropping = True

    def context_event(self, ctx: Context, line: bytes) -> None:
        if ctx.dropping:  # the tail of an oversized event
            ctx.dropping = False
            line = b'{"type":"error","name":"OutputTooLarge","value":"a result exceeded the size limit"}'
        try:
            event = protocol.loads(line.decode("utf-8", "replace"))
        except protocol.FrameError:
            return
        if not isinstance(event, dict) or ctx.current is None:
            return
        kind = event.get("type")
        if kind == "ready":
            ctx.backend = str(event.get("backend"))
            self.send({"id": ctx.current, "ev": "result", "backend": ctx.backend, "pid": ctx.proc.pid})
            ctx.current, ctx.deadline = None, None
        elif kind == "done":
            self.drain_output(ctx.proc)
            count = event.get("execution_count")
            self.send({"id": ctx.current, "ev": "cell_done", "execution_count": count if isinstance(count, int) else 0,
                       "timed_out": ctx.interrupted, "restarted": False, "truncated": ctx.proc.truncated})
            ctx.current, ctx.deadline = None, None
        else:
            for start in range(0, len(line), protocol.CHUNK):
                chunk = line[start:start + protocol.CHUNK]
                self.send({"id": ctx.current, "ev": "cell", "more": start + protocol.CHUNK < len(line)}, chunk)

    def context_timeout(self, ctx: Context) -> None:
        if ctx.current is None:
            ctx.deadline = None
        elif not ctx.interrupted:  # first: interrupt the cell and keep the state
            ctx.interrupted = True
            ctx.deadline = _monotonic() + INTERRUPT_GRACE
            try:
                os.kill(ctx.proc.pid, _signal.SIGINT)
            except ProcessLookupError:
                pass
        else:  # the interrupt did not work: kill it; the host restarts the context
            ctx.deadline = None
            _kill_tree(ctx.proc.pid)

    def drain_output(self, proc: Proc) -> None:
        for fd in list(proc.fds):
            for _ in range(64):
                try:
                    data = os.read(fd, protocol.CHUNK)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                self.forward(proc, proc.fds[fd], data)

    def context_died(self, ctx: Context) -> None:
        self.drain_output(ctx.proc)
        for fd in list(ctx.proc.fds):
            self.close_output(fd)
        if ctx.proc.stdin_fd is not None:
            if self.stdin_fds.pop(ctx.proc.stdin_fd, None):
                self.poll.unregister(ctx.proc.stdin_fd)
            os.close(ctx.proc.stdin_fd)
        if ctx.fd >= 0:
            self.poll.unregister(ctx.fd)
            del self.ctx_by_fd[ctx.fd]
            os.close(ctx.fd)
        del self.contexts[ctx.id]
        if ctx.current is not None:
            if ctx.interrupted:
                why = ("TimeoutError", "the cell ignored the interrupt after its timeout; the context was "
                       "killed and restarts empty on the next call")
            else:
                why = ("ContextDied", "the interpreter exited or crashed; the next call starts a fresh context")
            line = protocol.dumps({"type": "error", "name": why[0], "value": why[1], "traceback": ""})
            self.send({"id": ctx.current, "ev": "cell", "more": False}, line.encode())
            self.send({"id": ctx.current, "ev": "cell_done", "execution_count": 0, "timed_out": ctx.interrupted,
                       "restarted": True, "truncated": ctx.proc.truncated})

    # ---- artifacts -------------------------------------------------------------------------------
    def op_artifacts(self, rid: int, h: dict, body: bytes) -> None:
        """The host opens the artifact stream: listen on the sandbox-private abstract socket."""
        import _socket

        if self.listener is not None:
            raise ValueError("artifacts are already open")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.bind(ARTIFACT_ADDRESS)
        sock.listen(16)
        sock.setblocking(False)
        self.listener, self.artifact_rid = sock, rid  # type: ignore[assignment]
        self.poll.register(sock.fileno(), select.POLLIN)

    def accept_artifact(self) -> None:
        import _socket

        try:
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]
        except OSError:  # nothing pending, or out of descriptors: the agent must go on serving
            return
        if len(self.art_conns) >= MAX_ARTIFACT_CONNS:
            os.close(fd)
            return
        conn = _socket.socket(fileno=fd)
        conn.setblocking(False)
        try:  # who is saving: the peer's command line, for the record
            creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            with open(f"/proc/{int.from_bytes(creds[:4], sys.byteorder)}/cmdline", "rb") as f:
                cmd = f.read(4096).replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            cmd = ""
        self.next_aid += 1
        self.art_conns[fd] = {"sock": conn, "aid": self.next_aid, "head": bytearray(), "name": None, "cmd": cmd}
        if not self.paused:
            self.poll.register(fd, POLL_IN)

    def read_artifact(self, fd: int) -> None:
        conn = self.art_conns[fd]
        data = _read_some(fd)
        if data is None:
            return
        eof = not data
        if conn["name"] is None:  # the header line: {"name": ...}
            conn["head"] += data
            if b"\n" not in conn["head"] and not eof and len(conn["head"]) < 8192:
                return
            line, _, data = bytes(conn["head"]).partition(b"\n")
            try:
                name = protocol.loads(line.decode("utf-8", "replace")).get("name")  # type: ignore[attr-defined]
            except (protocol.FrameError, AttributeError):
                name = None
            if not isinstance(name, str):
                self.finish_artifact(fd, {"ok": False, "message": "bad request: send {\"name\": ...} first"})
                return
            conn["name"] = name
            self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": True,
                       "name": name, "cmd": conn["cmd"]})
        if data:
            self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": True}, data)
        if not eof:
            return
        # end of the client's data: the host answers with an artifact_ack
        if not self.paused:
            self.poll.unregister(fd)
        conn["done"] = True
        self.send({"id": self.artifact_rid, "ev": "artifact", "aid": conn["aid"], "more": False})

    def op_artifact_ack(self, rid: int, h: dict, body: bytes) -> None:
        for fd, conn in list(self.art_conns.items()):
            if conn["aid"] == h["aid"]:
                self.finish_artifact(fd, {"ok": bool(h.get("ok")), "message": h.get("message"),
                                          "size": h.get("size"), "sha256": h.get("sha256")})

    def finish_artifact(self, fd: int, answer: dict) -> None:
        conn = self.art_conns.pop(fd)
        if not conn.get("done") and not self.paused:
            self.poll.unregister(fd)
        try:
            conn["sock"].setblocking(True)
            conn["sock"].settimeout(2)
            conn["sock"].sendall(protocol.dumps(answer).encode())
        except OSError:
            pass
        conn["sock"].close()

    # ---- network bridge --------------------------------------------------------------------------
    def op_net_bridge(self, rid: int, h: dict, body: bytes) -> None:
        """Listen on loopback ports inside the sandbox; an accept thread per port passes each connection
        to the host's broker, so the agent's loop never waits on the network."""
        self.serve_proxy_ports(h, _bridge_accept, h["broker"])
        self.send({"id": rid, "ev": "ok"})

    def op_net_off(self, rid: int, h: dict, body: bytes) -> None:
        """network.mode = none: the proxy ports still listen, and every request gets at once an answer
        that says the network is off and which field opens it (curl, pip, git, node and Python clients
        read the proxy variables; without this they retry name lookups and time out, saying nothing).
        One thread per port polls all its connections (_refuse_network)."""
        if not self.network_off:  # a warm sandbox is told again at claim
            self.serve_proxy_ports(h, _refuse_network)
            self.network_off = True
        self.send({"id": rid, "ev": "ok"})

    def serve_proxy_ports(self, h: dict, serve: Callable[..., None], *args: object) -> None:
        """A loopback listener on the HTTP proxy and the SOCKS5 port, each served by ``serve(listener,
        kind, *args)`` on a thread of its own (kind: b"H" or b"S")."""
        import _socket
        import _thread

        for port, kind in ((int(h["http_port"]), b"H"), (int(h["socks_port"]), b"S")):
            listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            _thread.start_new_thread(serve, (listener, kind, *args))
            self.threads += 1

    # ---- files ---------------------------------------------------------------------------------
    @staticmethod
    def path(h: dict, key: str = "path") -> str:
        p = h[key]
        if not isinstance(p, str) or not p or "\0" in p:
            raise ValueError(f"{key} must be a non-empty string without NUL bytes")
        return os.path.normpath(os.path.join(HOME, p))

    @staticmethod
    def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
        # O_NONBLOCK so a FIFO cannot hang the agent; anything but a regular file is refused.
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR if _is_dir(st.st_mode) else errno.EINVAL,
                          "Is a directory" if _is_dir(st.st_mode) else "Not a regular file", path)
        os.set_blocking(fd, True)
        return fd

    def op_read(self, rid: int, h: dict, body: bytes) -> None:
        fd = self.open_regular(self.path(h), os.O_RDONLY)
        self.send({"id": rid, "ev": "meta", "size": os.fstat(fd).st_size})
        self.reads[rid] = [fd, protocol.READ_WINDOW]

    def op_credit(self, rid: int, h: dict, body: bytes) -> None:
        if rid in self.reads:
            self.reads[rid][1] += int(h["n"])

    def op_cancel(self, rid: int, h: dict, body: bytes) -> None:
        entry = self.reads.pop(rid, None)
        if entry:
            os.close(entry[0])

    def pump_reads(self) -> None:
        for rid, entry in list(self.reads.items()):
            while entry[1] > 0 and not self.paused:
                try:
                    data = os.read(entry[0], protocol.CHUNK)
                except OSError as exc:
                    del self.reads[rid]
                    os.close(entry[0])
                    self.error(rid, _errno_name(exc), exc.strerror or str(exc))
                    break
                if not data:
                    del self.reads[rid]
                    os.close(entry[0])
                    self.send({"id": rid, "ev": "end"})
                    break
                entry[1] -= 1
                self.send({"id": rid, "ev": "data"}, data)

    def op_write(self, rid: int, h: dict, body: bytes) -> None:
        if rid in self.failed_writes:
            if not h.get("more"):
                self.failed_writes.discard(rid)
            return
        entry = self.writes.get(rid)
        try:
            if entry is None:
                path = self.path(h)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if h.get("append") else os.O_TRUNC)
                entry = self.writes[rid] = [self.open_regular(path, flags), 0]
            view = memoryview(body)
            while view:
                n = os.write(entry[0], view)
                view = view[n:]
                entry[1] += n
        except (OSError, ValueError, KeyError):
            if entry is not None:
                os.close(self.writes.pop(rid)[0])
            if h.get("more"):
                self.failed_writes.add(rid)
            raise
        if not h.get("more"):
            os.close(self.writes.pop(rid)[0])
            self.send({"id": rid, "ev": "done", "size": entry[1]})

    def op_stat(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        self.send({"id": rid, "ev": "result", "entry": _entry(path, os.lstat(path))})

    def op_list(self, rid: int, h: dict, body: bytes) -> None:
        root = self.path(h)
        depth = max(1, min(int(h.get("depth", 1)), 32))
        entries: list[dict] = []
        self.list_bytes = 0
        truncated = self.walk(root, depth, entries)
        self.send({"id": rid, "ev": "result", "entries": entries, "truncated": truncated})

    def walk(self, directory: str, depth: int, entries: list) -> bool:
        with os.scandir(directory) as it:
            for item in it:
                if len(entries) >= LIST_LIMIT or self.list_bytes >= LIST_BYTES:
                    return True
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(_entry(item.path, st))
                self.list_bytes += 2 * len(item.path) + 120  # name and path, numbers, keys
                if depth > 1 and _is_dir(st.st_mode):
                    try:
                        if self.walk(item.path, depth - 1, entries):
                            return True
                    except OSError:
                        continue
        return False

    def op_mkdir(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        created = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        self.send({"id": rid, "ev": "result", "created": created})

    def op_remove(self, rid: int, h: dict, body: bytes) -> None:
        path = self.path(h)
        if _is_dir(os.lstat(path).st_mode):
            _rmtree(path)
        else:
            os.unlink(path)
        self.send({"id": rid, "ev": "ok"})

    def op_rename(self, rid: int, h: dict, body: bytes) -> None:
        os.rename(self.path(h, "src"), self.path(h, "dst"))
        self.send({"id": rid, "ev": "ok"})


def _bridge_accept(listener, kind, broker):  # noqa: ANN001
    """Accept connections on a loopback port and hand each one, as a descriptor, to the host's broker:
    the bytes then flow between the client and the broker directly, never through the agent."""
    import _socket

    while True:
        try:
            fd, _ = listener._accept()
        except OSError:  # out of descriptors, say: back off instead of spinning
            _sleep(0.05)
            continue
        client = _socket.socket(fileno=fd)
        upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)  # small records must not wait
            upstream.connect(broker)
            upstream.sendmsg([kind], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
        except OSError:
            pass
        finally:  # the broker holds its own copy now
            upstream.close()
            client.close()


NETWORK_OFF = "stockade: network is off for this sandbox (network.mode = none); network.mode = allowlist opens it"
_NETWORK_OFF_REPLY = (f"HTTP/1.1 403 {NETWORK_OFF}\r\nX-Stockade-Reason: {NETWORK_OFF}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: {len(NETWORK_OFF) + 1}\r\n"
                      f"Connection: close\r\n\r\n{NETWORK_OFF}\n").encode()


REFUSER_CONNECTIONS = 128   # open at once per port; past it the oldest is closed
REFUSER_HEAD_TIME = 1.0     # seconds a client may take to send a first byte (then it is answered anyway)
REFUSER_DRAIN_TIME = 0.5    # after the answer: read what is left, so the close is not a reset


def _refuse_network(listener, kind):  # noqa: ANN001
    """Answer every connection on a proxy port with the refusal: HTTP gets the 403 once its request
    starts (or after REFUSER_HEAD_TIME), SOCKS5 its 'not allowed by ruleset' reply. One thread polls all
    of a port's connections, each with a deadline, so hostile clients (silent, trickling, flooding,
    hundreds at once) delay no one and make the agent start no threads."""
    import _socket

    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    conns: dict = {}  # fd -> [socket, stage, deadline]; stages: 0 head/greeting, 1 SOCKS request, 2 draining

    def close(fd):  # noqa: ANN001, ANN202
        poller.unregister(fd)
        conns.pop(fd)[0].close()

    def answer(fd, conn, reply):  # noqa: ANN001, ANN202
        try:
            conn.send(reply)  # a few hundred bytes: the socket's buffer takes them whole
            conn.shutdown(_socket.SHUT_WR)
        except OSError:
            close(fd)
            return
        conns[fd][1:] = [2, _monotonic() + REFUSER_DRAIN_TIME]

    while True:
        now = _monotonic()
        for fd in [fd for fd, c in conns.items() if c[2] <= now]:
            conn, stage, _ = conns[fd]
            if stage == 0 and kind == b"H":  # a head that never completed still gets the reason
                answer(fd, conn, _NETWORK_OFF_REPLY)
            else:
                close(fd)
        wait = min((c[2] for c in conns.values()), default=now + 60) - now
        for fd, _ in poller.poll(max(0, int(wait * 1000)) + 1):
            if fd == listener.fileno():
                while True:
                    try:
                        cfd, _ = listener._accept()
                    except OSError:  # nothing more to accept now (or out of descriptors)
                        break
                    if len(conns) >= REFUSER_CONNECTIONS:
                        close(next(iter(conns)))
                    conn = _socket.socket(fileno=cfd)
                    conn.setblocking(False)
                    conns[cfd] = [conn, 0, _monotonic() + REFUSER_HEAD_TIME]
                    poller.register(cfd, select.POLLIN)
                continue
            entry = conns.get(fd)
            if entry is None:
                continue
            conn, stage, _ = entry
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
            elif stage == 2:
                continue  # draining
            elif kind == b"S":
                if stage == 0:  # greeting: answer "no authentication", then wait for the request
                    try:
                        conn.send(b"\x05\x00")
                    except OSError:
                        close(fd)
                        continue
                    entry[1] = 1
                else:  # the request: 0x02, connection not allowed by ruleset
                    answer(fd, conn, b"\x05\x02\x00\x01" + bytes(6))
            else:  # the first bytes of a request: the answer does not depend on the rest (drained after)
                answer(fd, conn, _NETWORK_OFF_REPLY)


def _read_some(fd: int) -> bytes | None:
    """What a non-blocking descriptor has: None if nothing yet, b"" at its end (or on an error)."""
    try:
        return os.read(fd, protocol.CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in the sandbox's PID namespace, from /proc (no child lists
    needed: CONFIG_PROC_CHILDREN and gVisor's /proc may lack them)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split(b" ", 2)
        if len(fields) >= 2 and fields[0] != b"Z":
            found[int(name)] = int(fields[1])
    return found


def _tree(top: int) -> set[int]:
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [top] if top in parents else []
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, ()))
    return tree


def _stop_then_kill(scan: Callable[[], set[int]]) -> int:
    """SIGSTOP what ``scan`` finds until a rescan finds nothing new (a stopped process forks no more,
    and a fork caught by the stop is restarted by the kernel, not completed), then SIGKILL it all."""
    stopped: set[int] = set()
    for _ in range(KILL_ROUNDS):
        new = scan() - stopped
        if not new:
            break
        for pid in new:
            _signal_quiet(pid, _signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal_quiet(pid, _signal.SIGKILL)
    return len(stopped)


def _kill_tree(top: int) -> None:
    """SIGKILL a command's top process and every descendant. The top is a child subreaper, so its
    descendants stay below it whatever they do with sessions, groups or double forks."""
    _stop_then_kill(lambda: _tree(top))
    _signal_quiet(top, _signal.SIGKILL)  # even if /proc could not be read


def _signal_quiet(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone already
        pass


def _which(program: str, path: str) -> str:
    """``program`` looked up in the command's own PATH (posix_spawnp would use the agent's)."""
    if "/" in program:
        return program
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", program)


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def _entry(path: str, st: os.stat_result) -> dict:
    kind = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}.get(st.st_mode & 0o170000, "other")
    return {"name": os.path.basename(path) or "/", "path": path, "type": kind, "size": st.st_size,
            "mode": st.st_mode & 0o7777, "mtime": st.st_mtime}


def _rmtree(path: str) -> None:
    # Never follows symlinks: a link to elsewhere is removed, not its target's contents.
    with os.scandir(path) as it:
        for item in it:
            if item.is_dir(follow_symlinks=False):
                _rmtree(item.path)
            else:
                os.unlink(item.path)
    os.rmdir(path)


def main() -> None:
    Agent(int(sys.argv[1])).run()


if __name__ == "__main__":
    main()
