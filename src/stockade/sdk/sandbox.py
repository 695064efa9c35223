"""``Sandbox`` (sync) and ``AsyncSandbox``: one API over a swappable transport.

Both faces run the same transport coroutines on the portal loop; output callbacks run in the caller's
thread (sync) or on the caller's loop (async), never on the portal loop.
"""

from __future__ import annotations

import asyncio
import builtins
import codecs
import os
import queue
import signal as signal_mod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, overload

from ..agent.protocol import CHUNK
from ..artifacts import ArtifactInfo
from ..errors import CommandError, PathNotFoundError, PolicyError, SandboxNotFoundError, TimeoutError
from ..policy import Policy
from .code import Context, Execution, ExecutionBuilder, ExecutionError, Result
from .models import CommandResult, EntryInfo, ProcessInfo, PtySize, SandboxInfo, SandboxMetrics, check_pty_size
from .portal import portal
from .transports.base import Transport

Callback = Callable[[str], Any]
_default_transport: Transport | None = None
_remote_transports: dict[tuple[str, str], Transport] = {}


def _transport(transport: Transport | None, api_url: str | None = None, api_key: str | None = None) -> Transport:
    """The explicit transport; else a server's (``api_url``, or STOCKADE_API_URL); else this host's."""
    global _default_transport
    if transport is not None:
        return transport
    api_url = api_url or os.environ.get("STOCKADE_API_URL") or None
    if api_url:
        key = api_key or os.environ.get("STOCKADE_API_KEY") or ""
        if (api_url, key) not in _remote_transports:
            from .transports.remote import RemoteTransport

            remote = RemoteTransport(api_url, key)
            _remote_transports[(api_url, key)] = remote
            portal().on_close(remote.close)
        return _remote_transports[(api_url, key)]
    if _default_transport is None:
        from .transports.local import LocalTransport

        _default_transport = LocalTransport()
        portal().on_close(_default_transport.close)
    return _default_transport


def _filtered(infos: list[SandboxInfo], metadata: Mapping[str, str] | None, state: str | None) -> list[SandboxInfo]:
    return [i for i in infos if (state is None or i.state == state)
            and all(i.metadata.get(k) == v for k, v in (metadata or {}).items())]


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def _checked(result: CommandResult, cmd: str | list[str], check: bool) -> CommandResult:
    if check and result.timed_out:
        raise TimeoutError(f"command {cmd!r} timed out and was killed", result)
    if check and result.exit_code != 0:
        raise CommandError(result, f"command {cmd!r} exited with {result.exit_code}: {result.stderr[-500:].strip()}")
    return result


class _Decoders:
    """Turns output chunks into text for callbacks without splitting UTF-8 sequences."""

    def __init__(self) -> None:
        self._d = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}

    def __call__(self, stream: str, data: bytes) -> str:
        return self._d[stream].decode(data)


def _unix(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


def _context_id(context: Context | str | None) -> str | None:
    return context.id if isinstance(context, Context) else context


async def _then_put(run: Any, events: queue.SimpleQueue[tuple[str, Any]]) -> Any:
    """Await ``run`` on the portal loop, then tell the waiting thread it is over (result or error)."""
    try:
        return await run
    finally:
        events.put(("done", None))


async def _next_chunk(agen: AsyncGenerator[bytes, None]) -> bytes | None:
    return await anext(agen, None)


async def _aiter_chunks(data: str | bytes | IO[bytes] | IO[str]) -> AsyncIterator[bytes]:
    if isinstance(data, str | bytes):
        yield _as_bytes(data) or b""
        return
    while chunk := data.read(CHUNK):
        yield chunk.encode() if isinstance(chunk, str) else chunk


class _HandleBase:
    """What both command handles keep: the process's output so far, as text, and its result."""

    def __init__(self, token: Any, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        self._token = token
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._decode = _Decoders()
        self._result: CommandResult | BaseException | None = None
        self.pid: int = token.pid
        self.stdout = ""
        self.stderr = ""

    def _absorb(self, kind: str, payload: Any) -> tuple[str, str, Callback | None] | None:
        """Record one event; returns (stream, text, callback to call), or None once the process ended."""
        if kind == "exit":
            self._result = payload
            return None
        text = self._decode(kind, payload)
        setattr(self, kind, getattr(self, kind) + text)
        return kind, text, self._callbacks[kind]

    def _final(self, check: bool) -> CommandResult:
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return _checked(self._result, self._token.cmd, check)


# ---------------------------------------------------------------------------------------------------
# sync


class CommandHandle(_HandleBase):
    """A background process. Iterate it for ``(stdout, stderr)`` chunks; ``wait()`` for the result."""

    def __init__(self, sandbox: Sandbox, token: Any, events: queue.SimpleQueue[tuple[str, Any]],
                 on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        super().__init__(token, on_stdout, on_stderr)
        self._sandbox, self._events = sandbox, events

    def _next_event(self) -> tuple[str, str] | None:
        event = self._absorb(*self._events.get())
        if event is None:
            return None
        kind, text, callback = event
        if callback is not None:
            callback(text)
        return kind, text

    def __iter__(self) -> Iterator[tuple[str | None, str | None]]:
        while self._result is None and (event := self._next_event()) is not None:
            yield (event[1], None) if event[0] == "stdout" else (None, event[1])

    def wait(self, check: bool = False) -> CommandResult:
        while self._result is None:
            self._next_event()
        return self._final(check)

    def kill(self) -> bool:
        return self._sandbox.commands.kill(self.pid)

    def send_stdin(self, data: str | bytes) -> None:
        self._sandbox.commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        self._sandbox.commands.send_stdin(self.pid, b"", eof=True)


class Commands:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @overload
    def run(self, cmd: str | list[str], *, background: Literal[False] = False, envs: Mapping[str, str] | None = None,
            cwd: str | None = None, stdin: str | bytes | None = None, timeout: float | None = None,
            on_stdout: Callback | None = None, on_stderr: Callback | None = None,
            check: bool = False) -> CommandResult: ...

    @overload
    def run(self, cmd: str | list[str], *, background: Literal[True], envs: Mapping[str, str] | None = None,
            cwd: str | None = None, stdin: str | bytes | None = None, timeout: float | None = None,
            on_stdout: Callback | None = None, on_stderr: Callback | None = None,
            check: bool = False) -> CommandHandle: ...

    def run(self, cmd: str | list[str], *, background: bool = False, envs: Mapping[str, str] | None = None,
            cwd: str | None = None, stdin: str | bytes | None = None, timeout: float | None = None,
            on_stdout: Callback | None = None, on_stderr: Callback | None = None,
            check: bool = False) -> CommandResult | CommandHandle:
        """Run ``cmd`` (a shell string, or an argv list run without a shell). A non-zero exit is
        returned, not raised, unless ``check=True``. ``timeout`` defaults to limits.command_timeout."""
        sb, t = self._sb, self._sb._transport
        data = _as_bytes(stdin)
        if not background and on_stdout is None and on_stderr is None:
            run = t.run(sb.sandbox_id, cmd, envs=envs, cwd=cwd, stdin=data, timeout=timeout, on_output=None)
            return _checked(portal().call(run), cmd, check)
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        async def start() -> Any:
            token = await t.start(sb.sandbox_id, cmd, envs=envs, cwd=cwd, stdin=data, timeout=timeout,
                                  on_output=lambda s, d: events.put((s, d)), background=background)
            task = asyncio.get_running_loop().create_task(t.wait(sb.sandbox_id, token))
            task.add_done_callback(lambda f: events.put(("exit", f.exception() or f.result())))
            return token

        token = portal().call(start())
        handle = CommandHandle(sb, token, events, on_stdout, on_stderr)
        return handle if background else handle.wait(check)

    def list(self) -> list[ProcessInfo]:
        return portal().call(self._sb._transport.processes(self._sb.sandbox_id))

    def kill(self, pid: int) -> bool:
        return portal().call(self._sb._transport.signal(self._sb.sandbox_id, pid, signal_mod.SIGKILL))

    def kill_all(self) -> int:
        """Kill every process in the sandbox (commands, what they left running, code contexts) but
        the agent; the sandbox stays usable. Returns how many processes were killed."""
        return portal().call(self._sb._transport.kill_all(self._sb.sandbox_id))

    def send_signal(self, pid: int, sig: int) -> bool:
        return portal().call(self._sb._transport.signal(self._sb.sandbox_id, pid, int(sig)))

    def send_stdin(self, pid: int, data: str | bytes, eof: bool = False) -> None:
        portal().call(self._sb._transport.send_stdin(self._sb.sandbox_id, pid, _as_bytes(data) or b"", eof))


PTY_SHELL = ["/bin/bash", "-i", "-l"]  # what E2B's pty.create runs
PTY_ENV = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # E2B's defaults
DataCallback = Callable[[bytes], Any]


def _pty_args(size: PtySize, user: str | None, envs: Mapping[str, str] | None,
              timeout: float | None) -> tuple[tuple[int, int], dict[str, str], float | None]:
    if user not in (None, "user"):
        raise PolicyError("user", f"everything in a sandbox runs as its one user ('user'); {user!r} is not available")
    env = {**PTY_ENV, **(envs or {})}
    return _pty_size(size), env, (timeout if timeout else None)


def _pty_size(size: PtySize) -> tuple[int, int]:
    """Checked here too, so every transport answers a bad size with the same PolicyError on "size"."""
    if not isinstance(size, PtySize):
        raise PolicyError("size", "size must be a PtySize(rows, cols)")
    return check_pty_size((size.rows, size.cols))


class PtyHandle:
    """A process on a pseudo-terminal (``sandbox.pty.create``). Iterate it for the terminal's output
    (bytes: the terminal's stdout and stderr are one stream); ``wait()`` for its result, whose ``stdout``
    is what the terminal printed (kept up to limits.output, like a command's)."""

    def __init__(self, sandbox: Sandbox, token: Any, events: queue.SimpleQueue[tuple[str, Any]],
                 on_data: DataCallback | None) -> None:
        self._sandbox, self._token, self._events, self._on_data = sandbox, token, events, on_data
        self._result: CommandResult | BaseException | None = None
        self.pid: int = token.pid

    def _next(self) -> bytes | None:
        kind, payload = self._events.get()
        if kind == "exit":
            self._result = payload
            return None
        if self._on_data is not None:
            self._on_data(payload)
        return bytes(payload)

    def __iter__(self) -> Iterator[bytes]:
        while self._result is None and (data := self._next()) is not None:
            yield data

    def wait(self) -> CommandResult:
        while self._result is None:
            self._next()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def send_stdin(self, data: str | bytes) -> None:
        self._sandbox.pty.send_stdin(self.pid, data)

    def resize(self, size: PtySize) -> bool:
        return self._sandbox.pty.resize(self.pid, size)

    def kill(self) -> bool:
        return self._sandbox.pty.kill(self.pid)


class Pty:
    """Pseudo-terminals, with E2B's names: ``create``, ``send_stdin``, ``resize``, ``kill``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def create(self, size: PtySize, user: str | None = None, cwd: str | None = None,
               envs: Mapping[str, str] | None = None, timeout: float | None = 60,
               on_data: DataCallback | None = None, *, cmd: str | list[str] | None = None) -> PtyHandle:
        """Start ``cmd`` (default ``/bin/bash -i -l``, as E2B) on a terminal of ``size``; TERM, LANG and
        LC_ALL default to E2B's. ``timeout`` seconds (60 by default; 0 or None: none) end it and its
        processes. ``on_data`` gets each chunk of output (bytes) as the handle is iterated or waited on."""
        sb, t = self._sb, self._sb._transport
        pty_size, env, limit = _pty_args(size, user, envs, timeout)
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        async def start() -> Any:
            token = await t.start(sb.sandbox_id, cmd or PTY_SHELL, envs=env, cwd=cwd, stdin=None, timeout=limit,
                                  on_output=lambda s, d: events.put((s, d)), background=True, pty=pty_size)
            task = asyncio.get_running_loop().create_task(t.wait(sb.sandbox_id, token))
            task.add_done_callback(lambda f: events.put(("exit", f.exception() or f.result())))
            return token

        return PtyHandle(sb, portal().call(start()), events, on_data)

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Type ``data`` into the terminal (``\\x03`` is Ctrl-C, ``\\x04`` Ctrl-D)."""
        portal().call(self._sb._transport.send_stdin(self._sb.sandbox_id, pid, _as_bytes(data) or b"", False))

    def resize(self, pid: int, size: PtySize) -> bool:
        """The terminal's new size; its foreground programs get SIGWINCH. False if it is not running."""
        rows, cols = _pty_size(size)
        return portal().call(self._sb._transport.resize(self._sb.sandbox_id, pid, rows, cols))

    def kill(self, pid: int) -> bool:
        """End the terminal's process and everything it started; False if it was not running."""
        return portal().call(self._sb._transport.signal(self._sb.sandbox_id, pid, signal_mod.SIGKILL))


class Files:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def _op(self, op: str, **args: Any) -> dict[str, Any]:
        return portal().call(self._sb._transport.file_op(self._sb.sandbox_id, op, **args))

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...
    @overload
    def read(self, path: str, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(self, path: str, format: Literal["text", "bytes", "stream"] = "text") -> str | bytes | Iterator[bytes]:
        """Read a file inside the sandbox (relative paths are under /home/user)."""
        stream = self._stream(path)
        if format == "stream":
            return stream
        data = b"".join(stream)
        return data.decode("utf-8", "replace") if format == "text" else data

    def _stream(self, path: str) -> Iterator[bytes]:
        agen = self._sb._transport.read(self._sb.sandbox_id, path)
        try:
            while (chunk := portal().call(_next_chunk(agen))) is not None:
                yield chunk
        finally:
            portal().call(agen.aclose())

    def write(self, path: str, data: str | bytes | IO[bytes] | IO[str]) -> EntryInfo:
        """Write (create or replace) a file; parent directories are created. Streams file objects."""
        portal().call(self._sb._transport.write(self._sb.sandbox_id, path, _aiter_chunks(data)))
        return self.get_info(path)

    def list(self, path: str = ".", depth: int = 1) -> list[EntryInfo]:
        return EntryInfo.list_from(self._op("list", path=path, depth=depth))

    def get_info(self, path: str) -> EntryInfo:
        return EntryInfo.from_stat(self._op("stat", path=path))

    def exists(self, path: str) -> bool:
        try:
            self._op("stat", path=path)
            return True
        except PathNotFoundError:
            return False

    def remove(self, path: str) -> None:
        self._op("remove", path=path)

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        self._op("rename", src=old_path, dst=new_path)
        return self.get_info(new_path)

    def make_dir(self, path: str) -> bool:
        return bool(self._op("mkdir", path=path).get("created"))


class Artifacts:
    """Artifacts a sandbox saved. They outlive it: ``Artifacts(sandbox_id)`` works after the sandbox is
    gone, until the policy's artifacts.retention."""

    def __init__(self, sandbox_id: str, transport: Transport | None = None) -> None:
        self.sandbox_id = sandbox_id
        self._transport = _transport(transport)

    def list(self) -> builtins.list[ArtifactInfo]:
        return portal().call(self._transport.list_artifacts(self.sandbox_id))

    def _chunks(self, name: str) -> Iterator[bytes]:
        agen = self._transport.read_artifact(self.sandbox_id, name)
        try:
            while (chunk := portal().call(_next_chunk(agen))) is not None:
                yield chunk
        finally:
            portal().call(agen.aclose())

    def get(self, name: str) -> bytes:
        return b"".join(self._chunks(name))

    def download(self, name: str, path: str | Path) -> Path:
        """Stream the artifact to a local file; returns its path."""
        target = Path(path)
        with open(target, "wb") as f:
            for chunk in self._chunks(name):
                f.write(chunk)
        return target


class AsyncArtifacts:
    """The async twin of :class:`Artifacts`."""

    def __init__(self, sandbox_id: str, transport: Transport | None = None) -> None:
        self.sandbox_id = sandbox_id
        self._transport = _transport(transport)

    async def list(self) -> builtins.list[ArtifactInfo]:
        return await portal().acall(self._transport.list_artifacts(self.sandbox_id))

    async def _chunks(self, name: str) -> AsyncIterator[bytes]:
        agen = self._transport.read_artifact(self.sandbox_id, name)
        try:
            while (chunk := await portal().acall(_next_chunk(agen))) is not None:
                yield chunk
        finally:
            await portal().acall(agen.aclose())

    async def get(self, name: str) -> bytes:
        return b"".join([chunk async for chunk in self._chunks(name)])

    async def download(self, name: str, path: str | Path) -> Path:
        target = Path(path)
        with open(target, "wb") as f:
            async for chunk in self._chunks(name):
                f.write(chunk)
        return target


class Network:
    """A sandbox's egress: ``update(allow=[...], deny=[...], ...)`` and ``events()``."""

    def __init__(self, sandbox_id: str, transport: Transport) -> None:
        self.sandbox_id, self._transport = sandbox_id, transport

    def update(self, **changes: Any) -> dict[str, Any]:
        """Narrow or widen the network policy (fields of ``network``); applies to new connections at once."""
        return portal().call(self._transport.update_network(self.sandbox_id, changes))

    def events(self) -> builtins.list[dict[str, Any]]:
        """Every connection attempt so far: host, port, address, decision, rule, bytes, duration."""
        return portal().call(self._transport.network_events(self.sandbox_id))


class AsyncNetwork:
    def __init__(self, sandbox_id: str, transport: Transport) -> None:
        self.sandbox_id, self._transport = sandbox_id, transport

    async def update(self, **changes: Any) -> dict[str, Any]:
        return await portal().acall(self._transport.update_network(self.sandbox_id, changes))

    async def events(self) -> builtins.list[dict[str, Any]]:
        return await portal().acall(self._transport.network_events(self.sandbox_id))


class _SandboxBase:
    def __init__(self, info: SandboxInfo, transport: Transport) -> None:
        self._transport = transport
        self._info = info
        self.sandbox_id = info.sandbox_id

    @property
    def id(self) -> str:
        return self.sandbox_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sandbox_id!r})"


class Sandbox(_SandboxBase):
    """A sandbox for untrusted code. ``with Sandbox.create() as sb: sb.commands.run("echo hi")``."""

    def __init__(self, info: SandboxInfo, transport: Transport) -> None:
        super().__init__(info, transport)
        self.commands = Commands(self)
        self.pty = Pty(self)
        self.files = Files(self)
        self.artifacts = Artifacts(self.sandbox_id, transport)
        self.network = Network(self.sandbox_id, transport)

    @classmethod
    def create(cls, policy: Policy | dict[str, Any] | str | Path | None = None, timeout: float | None = None,
               envs: Mapping[str, str] | None = None, metadata: Mapping[str, str] | None = None,
               *, user_id: str | None = None, runtime: str | None = None, template: str | None = None,
               api_url: str | None = None, api_key: str | None = None,
               transport: Transport | None = None) -> Sandbox:
        """Start a fresh sandbox. ``policy`` is a Policy, a dict, or a TOML/JSON file; ``timeout`` is
        its time to live in seconds (default lifetime.timeout). ``user_id`` names the end user it is for
        (a server may keep one sandbox per user). ``runtime`` picks the isolation ("jail"; default: the
        host's, STOCKADE_RUNTIME). ``template`` names the template whose layers are its root (see
        `stockade template list`; an unknown name is a PolicyError on field "template"). With ``api_url``
        (or STOCKADE_API_URL) it runs on a stockade server,
        authenticated by ``api_key`` (or STOCKADE_API_KEY)."""
        t = _transport(transport, api_url, api_key)
        return cls(portal().call(t.create(Policy.coerce(policy), timeout, envs, metadata, user_id=user_id,
                                          runtime=runtime, template=template)), t)

    @classmethod
    def connect(cls, sandbox_id: str, *, api_url: str | None = None, api_key: str | None = None,
                transport: Transport | None = None) -> Sandbox:
        t = _transport(transport, api_url, api_key)
        return cls(portal().call(t.info(sandbox_id)), t)

    @classmethod
    def list(cls, *, metadata: Mapping[str, str] | None = None, state: str | None = None,
             api_url: str | None = None, api_key: str | None = None,
             transport: Transport | None = None) -> list[SandboxInfo]:
        """Sandboxes you can reach, optionally only those whose metadata has every given key=value."""
        return _filtered(portal().call(_transport(transport, api_url, api_key).list()), metadata, state)

    def run_code(self, code: str, language: str = "python", context: Context | str | None = None,
                 envs: Mapping[str, str] | None = None, timeout: float | None = None,
                 on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 on_result: Callable[[Result], Any] | None = None,
                 on_error: Callable[[ExecutionError], Any] | None = None) -> Execution:
        """Run a cell in a stateful interpreter (a context; by default one per language) and return its
        logs, results (the last expression's value, displays, figures) and error. ``timeout`` interrupts
        the cell and keeps the context; a cell that ignores the interrupt gets its context restarted."""
        builder = ExecutionBuilder(on_stdout, on_stderr, on_result, on_error)
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        run = self._transport.run_code(
            self.sandbox_id, code, language=language, context_id=_context_id(context), envs=envs, timeout=timeout,
            on_output=lambda s, d: events.put((s, d)), on_event=lambda e: events.put(("event", e)))
        future = asyncio.run_coroutine_threadsafe(_then_put(run, events), portal().loop)
        try:
            while True:
                kind, payload = events.get()
                if kind == "done":
                    return builder.finish(future.result())
                builder.event(payload) if kind == "event" else builder.output(kind, payload)
        except BaseException:
            future.cancel()
            raise

    def create_code_context(self, language: str = "python", cwd: str | None = None) -> Context:
        return portal().call(self._transport.create_context(self.sandbox_id, language, cwd))

    def list_code_contexts(self) -> builtins.list[Context]:
        return portal().call(self._transport.list_contexts(self.sandbox_id))

    def restart_code_context(self, context: Context | str) -> Context:
        return portal().call(self._transport.restart_context(self.sandbox_id, _context_id(context) or ""))

    def remove_code_context(self, context: Context | str) -> None:
        portal().call(self._transport.remove_context(self.sandbox_id, _context_id(context) or ""))

    def info(self) -> SandboxInfo:
        return portal().call(self._transport.info(self.sandbox_id))

    def set_timeout(self, seconds: float) -> None:
        portal().call(self._transport.set_timeout(self.sandbox_id, seconds))

    def snapshot(self, name: str | None = None) -> str:
        """Save this sandbox's files (its root's changes and /home/user) as a new template, which
        ``Sandbox.create(template=...)`` starts from; returns its name (default ``<template>-snap-<hex>``).
        Only for a sandbox from a template; it keeps running. Processes and memory are not saved."""
        return portal().call(self._transport.snapshot(self.sandbox_id, name))

    def get_metrics(self, start: datetime | None = None, end: datetime | None = None) -> builtins.list[SandboxMetrics]:
        """What the sandbox uses: a sample taken now, after the earlier ones still kept (the newest 720),
        those between ``start`` and ``end``. ``cpu_used_pct`` averages since the sample before."""
        return portal().call(self._transport.metrics(self.sandbox_id, _unix(start), _unix(end)))

    def get_host(self, port: int) -> str:
        """"HOST:PORT" on this machine (its loopback) whose connections reach ``port`` inside the sandbox,
        for a port its policy's ``network.expose`` lists: a dev server's preview, say. Local mode; through a
        server, the port answers HTTP at ``/sandboxes/{id}/ports/{port}/``."""
        host, bound = portal().call(self._transport.forward_port(self.sandbox_id, port))
        return f"{host}:{bound}"

    def kill(self) -> bool:
        return portal().call(self._transport.kill(self.sandbox_id))

    def audit_log(self, type: str | None = None, after_id: int | None = None,
                  limit: int = 1000) -> builtins.list[dict[str, Any]]:
        """The sandbox's recorded events (commands and their output, files, network...), oldest first;
        ``type="command"`` selects command.start and command.end. Kept after the sandbox ends."""
        return portal().call(self._transport.audit_events(self.sandbox_id, type, after_id, limit))

    def is_running(self) -> bool:
        try:
            return self.info().state == "running"
        except SandboxNotFoundError:
            return False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---------------------------------------------------------------------------------------------------
# async


class AsyncCommandHandle(_HandleBase):
    """The async twin of :class:`CommandHandle`; callbacks may be coroutine functions."""

    def __init__(self, sandbox: AsyncSandbox, token: Any, events: asyncio.Queue[tuple[str, Any]],
                 on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        super().__init__(token, on_stdout, on_stderr)
        self._sandbox, self._events = sandbox, events

    async def _next_event(self) -> tuple[str, str] | None:
        event = self._absorb(*await self._events.get())
        if event is None:
            return None
        kind, text, callback = event
        if callback is not None:
            maybe = callback(text)
            if asyncio.iscoroutine(maybe):
                await maybe
        return kind, text

    async def __aiter__(self) -> AsyncIterator[tuple[str | None, str | None]]:
        while self._result is None and (event := await self._next_event()) is not None:
            yield (event[1], None) if event[0] == "stdout" else (None, event[1])

    async def wait(self, check: bool = False) -> CommandResult:
        while self._result is None:
            await self._next_event()
        return self._final(check)

    async def kill(self) -> bool:
        return await self._sandbox.commands.kill(self.pid)

    async def send_stdin(self, data: str | bytes) -> None:
        await self._sandbox.commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        await self._sandbox.commands.send_stdin(self.pid, b"", eof=True)


class AsyncCommands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def run(self, cmd: str | list[str], *, background: bool = False, envs: Mapping[str, str] | None = None,
                  cwd: str | None = None, stdin: str | bytes | None = None, timeout: float | None = None,
                  on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                  check: bool = False) -> Any:
        """Same as ``Sandbox.commands.run``; returns CommandResult, or AsyncCommandHandle in background."""
        sb, t = self._sb, self._sb._transport
        data = _as_bytes(stdin)
        if not background and on_stdout is None and on_stderr is None:
            run = t.run(sb.sandbox_id, cmd, envs=envs, cwd=cwd, stdin=data, timeout=timeout, on_output=None)
            return _checked(await portal().acall(run), cmd, check)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def push(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        async def start() -> Any:
            token = await t.start(sb.sandbox_id, cmd, envs=envs, cwd=cwd, stdin=data, timeout=timeout,
                                  on_output=push, background=background)
            task = asyncio.get_running_loop().create_task(t.wait(sb.sandbox_id, token))
            task.add_done_callback(lambda f: push("exit", f.exception() or f.result()))
            return token

        token = await portal().acall(start())
        handle = AsyncCommandHandle(sb, token, events, on_stdout, on_stderr)
        if background:
            return handle
        return await handle.wait(check)

    async def list(self) -> list[ProcessInfo]:
        return await portal().acall(self._sb._transport.processes(self._sb.sandbox_id))

    async def kill(self, pid: int) -> bool:
        return await portal().acall(self._sb._transport.signal(self._sb.sandbox_id, pid, signal_mod.SIGKILL))

    async def kill_all(self) -> int:
        """Kill every process in the sandbox but the agent; see Commands.kill_all."""
        return await portal().acall(self._sb._transport.kill_all(self._sb.sandbox_id))

    async def send_signal(self, pid: int, sig: int) -> bool:
        return await portal().acall(self._sb._transport.signal(self._sb.sandbox_id, pid, int(sig)))

    async def send_stdin(self, pid: int, data: str | bytes, eof: bool = False) -> None:
        await portal().acall(self._sb._transport.send_stdin(self._sb.sandbox_id, pid, _as_bytes(data) or b"", eof))


class AsyncPtyHandle:
    """The async twin of :class:`PtyHandle`; ``on_data`` may be a coroutine function."""

    def __init__(self, sandbox: AsyncSandbox, token: Any, events: asyncio.Queue[tuple[str, Any]],
                 on_data: DataCallback | None) -> None:
        self._sandbox, self._token, self._events, self._on_data = sandbox, token, events, on_data
        self._result: CommandResult | BaseException | None = None
        self.pid: int = token.pid

    async def _next(self) -> bytes | None:
        kind, payload = await self._events.get()
        if kind == "exit":
            self._result = payload
            return None
        if self._on_data is not None:
            maybe = self._on_data(payload)
            if asyncio.iscoroutine(maybe):
                await maybe
        return bytes(payload)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._result is None and (data := await self._next()) is not None:
            yield data

    async def wait(self) -> CommandResult:
        while self._result is None:
            await self._next()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    async def send_stdin(self, data: str | bytes) -> None:
        await self._sandbox.pty.send_stdin(self.pid, data)

    async def resize(self, size: PtySize) -> bool:
        return await self._sandbox.pty.resize(self.pid, size)

    async def kill(self) -> bool:
        return await self._sandbox.pty.kill(self.pid)


class AsyncPty:
    """The async twin of :class:`Pty`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def create(self, size: PtySize, user: str | None = None, cwd: str | None = None,
                     envs: Mapping[str, str] | None = None, timeout: float | None = 60,
                     on_data: DataCallback | None = None, *, cmd: str | list[str] | None = None) -> AsyncPtyHandle:
        """Same as ``Sandbox.pty.create``."""
        sb, t = self._sb, self._sb._transport
        pty_size, env, limit = _pty_args(size, user, envs, timeout)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def push(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        async def start() -> Any:
            token = await t.start(sb.sandbox_id, cmd or PTY_SHELL, envs=env, cwd=cwd, stdin=None, timeout=limit,
                                  on_output=push, background=True, pty=pty_size)
            task = asyncio.get_running_loop().create_task(t.wait(sb.sandbox_id, token))
            task.add_done_callback(lambda f: push("exit", f.exception() or f.result()))
            return token

        return AsyncPtyHandle(sb, await portal().acall(start()), events, on_data)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        await portal().acall(self._sb._transport.send_stdin(self._sb.sandbox_id, pid, _as_bytes(data) or b"", False))

    async def resize(self, pid: int, size: PtySize) -> bool:
        rows, cols = _pty_size(size)
        return await portal().acall(self._sb._transport.resize(self._sb.sandbox_id, pid, rows, cols))

    async def kill(self, pid: int) -> bool:
        return await portal().acall(self._sb._transport.signal(self._sb.sandbox_id, pid, signal_mod.SIGKILL))


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def _op(self, op: str, **args: Any) -> dict[str, Any]:
        return await portal().acall(self._sb._transport.file_op(self._sb.sandbox_id, op, **args))

    async def read(self, path: str, format: Literal["text", "bytes", "stream"] = "text") -> Any:
        stream = self._stream(path)
        if format == "stream":
            return stream
        data = b"".join([chunk async for chunk in stream])
        return data.decode("utf-8", "replace") if format == "text" else data

    async def _stream(self, path: str) -> AsyncIterator[bytes]:
        agen = self._sb._transport.read(self._sb.sandbox_id, path)
        try:
            while (chunk := await portal().acall(_next_chunk(agen))) is not None:
                yield chunk
        finally:
            await portal().acall(agen.aclose())

    async def write(self, path: str, data: str | bytes | IO[bytes] | IO[str]) -> EntryInfo:
        await portal().acall(self._sb._transport.write(self._sb.sandbox_id, path, _aiter_chunks(data)))
        return await self.get_info(path)

    async def list(self, path: str = ".", depth: int = 1) -> list[EntryInfo]:
        return EntryInfo.list_from(await self._op("list", path=path, depth=depth))

    async def get_info(self, path: str) -> EntryInfo:
        return EntryInfo.from_stat(await self._op("stat", path=path))

    async def exists(self, path: str) -> bool:
        try:
            await self._op("stat", path=path)
            return True
        except PathNotFoundError:
            return False

    async def remove(self, path: str) -> None:
        await self._op("remove", path=path)

    async def rename(self, old_path: str, new_path: str) -> EntryInfo:
        await self._op("rename", src=old_path, dst=new_path)
        return await self.get_info(new_path)

    async def make_dir(self, path: str) -> bool:
        return bool((await self._op("mkdir", path=path)).get("created"))


class AsyncSandbox(_SandboxBase):
    """The async twin of :class:`Sandbox`: ``async with await AsyncSandbox.create() as sb: ...``."""

    def __init__(self, info: SandboxInfo, transport: Transport) -> None:
        super().__init__(info, transport)
        self.commands = AsyncCommands(self)
        self.pty = AsyncPty(self)
        self.files = AsyncFiles(self)
        self.artifacts = AsyncArtifacts(self.sandbox_id, transport)
        self.network = AsyncNetwork(self.sandbox_id, transport)

    @classmethod
    async def create(cls, policy: Policy | dict[str, Any] | str | Path | None = None,
                     timeout: float | None = None, envs: Mapping[str, str] | None = None,
                     metadata: Mapping[str, str] | None = None, *, user_id: str | None = None,
                     runtime: str | None = None, template: str | None = None, api_url: str | None = None,
                     api_key: str | None = None, transport: Transport | None = None) -> AsyncSandbox:
        t = _transport(transport, api_url, api_key)
        return cls(await portal().acall(t.create(Policy.coerce(policy), timeout, envs, metadata, user_id=user_id,
                                                 runtime=runtime, template=template)), t)

    @classmethod
    async def connect(cls, sandbox_id: str, *, api_url: str | None = None, api_key: str | None = None,
                      transport: Transport | None = None) -> AsyncSandbox:
        t = _transport(transport, api_url, api_key)
        return cls(await portal().acall(t.info(sandbox_id)), t)

    @classmethod
    async def list(cls, *, metadata: Mapping[str, str] | None = None, state: str | None = None,
                   api_url: str | None = None, api_key: str | None = None,
                   transport: Transport | None = None) -> list[SandboxInfo]:
        return _filtered(await portal().acall(_transport(transport, api_url, api_key).list()), metadata, state)

    async def run_code(self, code: str, language: str = "python", context: Context | str | None = None,
                       envs: Mapping[str, str] | None = None, timeout: float | None = None,
                       on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                       on_result: Callable[[Result], Any] | None = None,
                       on_error: Callable[[ExecutionError], Any] | None = None) -> Execution:
        """Same as ``Sandbox.run_code``; callbacks may be coroutine functions."""
        builder = ExecutionBuilder(on_stdout, on_stderr, on_result, on_error)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def push(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        run = self._transport.run_code(
            self.sandbox_id, code, language=language, context_id=_context_id(context), envs=envs, timeout=timeout,
            on_output=push, on_event=lambda e: push("event", e))
        future = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run, portal().loop))
        future.add_done_callback(lambda _f: push("done", None))
        while True:
            kind, payload = await events.get()
            if kind == "done":
                return builder.finish(await future)
            maybe = builder.event(payload) if kind == "event" else builder.output(kind, payload)
            if asyncio.iscoroutine(maybe):
                await maybe

    async def create_code_context(self, language: str = "python", cwd: str | None = None) -> Context:
        return await portal().acall(self._transport.create_context(self.sandbox_id, language, cwd))

    async def list_code_contexts(self) -> builtins.list[Context]:
        return await portal().acall(self._transport.list_contexts(self.sandbox_id))

    async def restart_code_context(self, context: Context | str) -> Context:
        return await portal().acall(self._transport.restart_context(self.sandbox_id, _context_id(context) or ""))

    async def remove_code_context(self, context: Context | str) -> None:
        await portal().acall(self._transport.remove_context(self.sandbox_id, _context_id(context) or ""))

    async def info(self) -> SandboxInfo:
        return await portal().acall(self._transport.info(self.sandbox_id))

    async def set_timeout(self, seconds: float) -> None:
        await portal().acall(self._transport.set_timeout(self.sandbox_id, seconds))

    async def snapshot(self, name: str | None = None) -> str:
        """See ``Sandbox.snapshot``."""
        return await portal().acall(self._transport.snapshot(self.sandbox_id, name))

    async def get_metrics(self, start: datetime | None = None,
                          end: datetime | None = None) -> builtins.list[SandboxMetrics]:
        return await portal().acall(self._transport.metrics(self.sandbox_id, _unix(start), _unix(end)))

    async def get_host(self, port: int) -> str:
        host, bound = await portal().acall(self._transport.forward_port(self.sandbox_id, port))
        return f"{host}:{bound}"

    async def kill(self) -> bool:
        return await portal().acall(self._transport.kill(self.sandbox_id))

    async def audit_log(self, type: str | None = None, after_id: int | None = None,
                        limit: int = 1000) -> builtins.list[dict[str, Any]]:
        return await portal().acall(self._transport.audit_events(self.sandbox_id, type, after_id, limit))

    async def is_running(self) -> bool:
        try:
            return (await self.info()).state == "running"
        except SandboxNotFoundError:
            return False

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
