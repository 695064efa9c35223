"""Code-interpreter contexts: the interpreter process of each, its cells, events and timeouts."""

from __future__ import annotations

import _signal
import os
import sys
from time import monotonic as _monotonic

TYPE_CHECKING = False  # typing costs a cold start an import; mypy reads this name as true
if TYPE_CHECKING:
    pass

try:
    from . import protocol
    from .common import CELL_EVENT_LIMIT, INTERRUPT_GRACE, POLL_IN, _read_some
    from .processes import Proc, Processes, _kill_tree
except ImportError:  # run as a script inside the sandbox
    import protocol  # type: ignore[no-redef]
    from common import CELL_EVENT_LIMIT, INTERRUPT_GRACE, POLL_IN, _read_some  # type: ignore[no-redef]
    from processes import Proc, Processes, _kill_tree  # type: ignore[no-redef]

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


class Contexts(Processes):
    def op_ctx_start(self, rid: int, h: dict, body: bytes) -> None:
        ctx_id = h["ctx"]
        if not isinstance(ctx_id, str) or ctx_id in self.contexts:
            raise ValueError(f"context {ctx_id!r} exists or is not a string")
        here = os.path.dirname(os.path.abspath(sys.argv[0]))  # the agent's directory (it runs from a zip)
        language = h["language"]
        if language == "javascript":
            argv = ["node", os.path.join(here, "interpreter.js")]
        else:
            # h["python"]: an argv (a template sandbox's host python starts through its own loader); its script
            # the bytecode of the host's python, or the source for a template's own python
            script = h.get("script") or "interpreter.pyc"
            if script not in ("interpreter.pyc", "interpreter.py"):
                raise ValueError(f"unknown interpreter script {script!r}")
            argv = [*h["python"], os.path.join(here, script)] + (["--bash"] if language == "bash" else [])
        env = dict(self.env)
        env.update(h.get("env") or {})
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        ev_r, ev_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.spawn(argv, env, h.get("cwd") or self.home, in_r, out_w, err_w, ev_w)
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
