"""Processes: spawning commands, their output and stdin, signals, reaping, deadlines, tree kills."""

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
    from .common import (
        CHILD_DEFAULT_SIGNALS,
        KILL_ROUNDS,
        KILL_WAIT,
        POLL_IN,
        PR_SET_CHILD_SUBREAPER,
        STDIN_LIMIT,
        AgentBase,
        _errno_get,
        _libc_function,
        _proc_stat,
        _proc_stats,
        _read_some,
    )
except ImportError:  # run as a script inside the sandbox
    from common import (  # type: ignore[no-redef]
        CHILD_DEFAULT_SIGNALS,
        KILL_ROUNDS,
        KILL_WAIT,
        POLL_IN,
        PR_SET_CHILD_SUBREAPER,
        STDIN_LIMIT,
        AgentBase,
        _errno_get,
        _libc_function,
        _proc_stat,
        _proc_stats,
        _read_some,
    )

TERM = "xterm-256color"  # a terminal's TERM when the caller sets none
MAX_PTY_SIZE = 4096      # rows and columns of a terminal, each at most


class Proc:
    __slots__ = ("pid", "rid", "cmd", "tag", "fds", "stdin_fd", "stdin_buf", "stdin_eof", "limit",
                 "sent", "truncated", "status", "deadline", "timed_out", "tty")

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
        self.tty: int | None = None           # a pty process: the master's descriptor kept for resizes


class Processes(AgentBase):
    def op_exec(self, rid: int, h: dict, body: bytes) -> None:
        argv = h.get("argv")
        if argv is None:
            argv = ["/bin/sh", "-c", h["cmd"]]
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = dict(self.env)
        env.update(h.get("env") or {})
        cwd = h.get("cwd") or self.home
        size = h.get("pty")
        if size is not None:
            rows, cols = _pty_size(size)
            env.setdefault("TERM", TERM)
            # The child's stdin, stdout and stderr are the terminal's slave side; the agent keeps three
            # descriptors of the master (output, input, resizes: poll watches each for one thing). All are
            # close-on-exec (os.openpty and os.dup make them non-inheritable), and the child closes the
            # master's before exec as well, so no command holds another's terminal.
            master, slave = os.openpty()
            try:
                _set_winsize(master, rows, cols)
                tty, in_w = os.dup(master), os.dup(master)
            except OSError:
                os.close(master)
                os.close(slave)
                raise
            out_r, err_r = master, -1
            child_fds, mine = (slave, slave, slave), (master, tty, in_w)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            tty = -1
            child_fds, mine = (in_r, out_w, err_w), (out_r, err_r, in_w)
        proc = Proc(0, rid, h.get("cmd") or " ".join(argv), h.get("tag"), int(h["limit"]))
        try:
            pid = self.spawn(argv, env, cwd, *child_fds, terminal=size is not None, close=mine)
        except OSError as exc:
            for fd in mine:
                os.close(fd)
            what = f"cannot enter {cwd!r}" if exc.filename == cwd else f"cannot run {argv[0]!r}"
            self.send({"id": rid, "ev": "started", "pid": 0})
            self.send({"id": rid, "ev": "stderr"}, f"stockade: {what}: {exc.strerror or exc}\n".encode())
            self.send({"id": rid, "ev": "exit", "code": 127, "signal": None, "timed_out": False,
                       "truncated": proc.truncated})
            return
        finally:
            for fd in set(child_fds):
                os.close(fd)
        proc.pid = pid
        if tty >= 0:
            proc.tty = tty
        self.attach(proc, out_r, err_r, in_w)
        proc.stdin_buf += body
        # a terminal's input has no end (Ctrl-D is a byte the terminal interprets): it stays open
        proc.stdin_eof = size is None and not h.get("stdin_open", False)
        timeout = h.get("timeout")
        if timeout:
            proc.deadline = _monotonic() + float(timeout)
        self.procs[pid] = proc
        self.send({"id": rid, "ev": "started", "pid": pid})
        self.write_stdin(proc)

    def attach(self, proc: Proc, out_r: int, err_r: int, in_w: int) -> None:
        for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
            if fd < 0:  # a terminal has one output
                continue
            os.set_blocking(fd, False)
            proc.fds[fd] = name
            self.by_fd[fd] = proc
            if not self.paused:
                self.poll.register(fd, POLL_IN)
        os.set_blocking(in_w, False)
        proc.stdin_fd = in_w

    def spawn(self, argv: list, env: dict, cwd: str, stdin: int, stdout: int, stderr: int, events: int = -1,
              terminal: bool = False, close: tuple[int, ...] = ()) -> int:
        """fork + exec in a new session with default signal handling. Every descriptor of the agent is
        close-on-exec, so the child gets only 0-2 (and 3 for a code-interpreter context's events).
        ``terminal``: 0-2 are a pty's slave, made the new session's controlling terminal (TIOCSCTTY), so
        the command's process group is its foreground group (Ctrl-C, SIGWINCH reach it). ``close``: the
        agent's ends, closed in the child at once rather than only at exec.
        fork, not posix_spawn: the child must make itself a child subreaper (kept across execve), so
        every orphan of the command reparents to the command's top process and a kill finds the whole
        tree (setsid, setpgid and double forks included), and lower RLIMIT_NPROC."""
        program = _which(argv[0], env.get("PATH", ""))
        fds = (stdin, stdout, stderr) + ((events,) if events >= 0 else ())
        # The agent's threads count against its uid too, unless it runs under a uid of its own (become).
        # Then the command's top process counts against the agent's uid, which forked it (gVisor does not
        # move the count at setresuid, as Linux does), so one fewer is left for what the command starts.
        if self.user_uid is None:
            nproc = self.nproc + self.threads if self.nproc else 0
        else:
            nproc = max(1, self.nproc - 1) if self.nproc else 0
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: nothing here may return into the agent's loop
            step = b"setup"
            try:
                for sig in CHILD_DEFAULT_SIGNALS:
                    _signal.signal(sig, _signal.SIG_DFL)
                for fd in close:
                    os.close(fd)
                os.setsid()
                self.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                if nproc and self.setrlimit is not None:
                    self.setrlimit(self.rlimit_nproc, (nproc, nproc))
                if self.user_uid is not None:  # every id the command's: no capability survives
                    os.setresuid(self.user_uid, self.user_uid, self.user_uid)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.set_inheritable(target, True)
                if terminal:
                    step = b"tty"
                    _ioctl(0, TIOCSCTTY, 0)
                    step = b"setup"
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
        if h.get("eof") and proc.tty is not None:
            self.error(rid, "EINVAL", "a terminal's input has no end: send Ctrl-D (\\x04) to end a read, or kill it")
            return
        if len(proc.stdin_buf) + len(body) > STDIN_LIMIT:
            self.error(rid, "ENOBUFS", "the process is not reading its stdin; buffer is full")
            return
        proc.stdin_buf += body
        proc.stdin_eof = proc.stdin_eof or bool(h.get("eof"))
        self.write_stdin(proc)
        if rid:
            self.send({"id": rid, "ev": "ok"})

    def op_resize(self, rid: int, h: dict, body: bytes) -> None:
        """A pty process's terminal size (TIOCSWINSZ on the master): the kernel sends SIGWINCH to the
        terminal's foreground process group."""
        proc = self.procs.get(h["pid"])
        if proc is None or proc.status is not None:
            self.error(rid, "ESRCH", f"process {h['pid']} is not running")
            return
        if proc.tty is None:
            self.error(rid, "ENOTTY", f"process {h['pid']} was not started with a terminal")
            return
        rows, cols = _pty_size(h)
        _set_winsize(proc.tty, rows, cols)
        self.send({"id": rid, "ev": "ok"})

    def op_signal(self, rid: int, h: dict, body: bytes) -> None:
        pid, sig = h["pid"], int(h["sig"])
        if pid not in self.procs:
            self.error(rid, "ESRCH", f"no process {pid} started by the agent is running")
            return
        if sig == _signal.SIGKILL:  # a kill ends everything the command started, wherever it went
            _kill_tree(pid)
            self.reap()  # answered once all of it is gone: a `ps` sent next sees none of it
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
        if proc.tty is not None:
            os.close(proc.tty)
            proc.tty = None
        del self.procs[proc.pid]
        status = proc.status
        self.send({"id": proc.rid, "ev": "exit",
                   "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                   "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                   "timed_out": proc.timed_out, "truncated": proc.truncated})

    def next_timeout(self) -> int:
        deadlines = [p.deadline for p in self.procs.values() if p.deadline and not p.timed_out]
        deadlines += [c.deadline for c in self.contexts.values() if c.deadline]
        deadlines += [c.deadline for c in self.ports.values() if c.connecting]
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - _monotonic()) * 1000) + 1)

    def check_deadlines(self) -> None:
        now = _monotonic()
        if self.ports:
            self.port_deadlines(now)
        for ctx in list(self.contexts.values()):
            if ctx.deadline and now >= ctx.deadline:
                self.context_timeout(ctx)
        for proc in list(self.procs.values()):
            if proc.deadline and not proc.timed_out and now >= proc.deadline:
                proc.timed_out = True
                _kill_tree(proc.pid)


def _pty_size(size: dict) -> tuple[int, int]:
    rows, cols = size["rows"], size["cols"]
    for value in (rows, cols):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PTY_SIZE:
            raise ValueError(f"a terminal's rows and cols are whole numbers from 1 to {MAX_PTY_SIZE}")
    return rows, cols


_BYTEORDER = sys.byteorder
# Linux's ioctl numbers (asm-generic: x86_64 and arm64 alike), so fcntl and termios (extension modules, not
# built in) are not imported: ioctl is called through _ctypes, as prctl is.
TIOCSCTTY, TIOCSWINSZ = 0x540E, 0x5414
_ioctl_fn: Callable[..., int] | None = None


def _ioctl(fd: int, request: int, arg: int | bytes) -> None:
    global _ioctl_fn
    if _ioctl_fn is None:
        _ioctl_fn = _libc_function("ioctl")
    if _ioctl_fn(fd, request, arg) != 0:
        code = _errno_get()
        raise OSError(code, os.strerror(code))


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    # struct winsize {unsigned short ws_row, ws_col, ws_xpixel, ws_ypixel;}
    _ioctl(fd, TIOCSWINSZ, rows.to_bytes(2, _BYTEORDER) + cols.to_bytes(2, _BYTEORDER) + bytes(4))


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in the sandbox's PID namespace, from /proc (no child lists
    needed: CONFIG_PROC_CHILDREN and gVisor's /proc may lack them)."""
    return {pid: int(fields[1]) for pid, fields in _proc_stats() if len(fields) >= 2 and fields[0] != b"Z"}


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
    _wait_dead(stopped)
    return len(stopped)


def _wait_dead(pids: set[int]) -> None:
    """Until every process in ``pids`` has died (a zombie or gone), or KILL_WAIT has passed: SIGKILL
    is delivered asynchronously (under gVisor, noticeably), and callers answer only after it."""
    deadline = _monotonic() + KILL_WAIT
    while pids and _monotonic() < deadline:
        pids = {pid for pid in pids if _running(pid)}
        if pids:
            _sleep(0.001)


def _running(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[:1] != [b"Z"]


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
