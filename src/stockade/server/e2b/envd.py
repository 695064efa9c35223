"""What E2B's in-sandbox daemon (envd, port 49983) serves, over stockade's agent: Connect RPC
``process.Process`` and ``filesystem.Filesystem``, ``GET``/``POST /files`` and ``GET /health``.

Processes: ``Start`` runs the command through the manager (``/bin/bash -l -c CMD`` as the SDKs send it)
and streams ``start{pid}``, ``data{stdout|stderr}`` (base64), ``keepalive`` and ``end``; a call deadline
(``Connect-Timeout-Ms``, the SDK's ``timeout``) is the command's timeout and ends the stream with
``deadline_exceeded``. A process outlives its stream (E2B's background commands): ``Connect`` re-attaches
to its output from then on, ``SendInput``/``StreamInput``/``CloseStdin``/``SendSignal`` reach it by pid
or tag. A ``Start`` with ``pty`` (rows, cols) runs the command on a pseudo-terminal (the agent's: the
controlling terminal of a new session): its output streams as ``data{pty}``, ``SendInput``/``StreamInput``
with ``input.pty`` type into it, ``Update`` resizes it (the kernel sends SIGWINCH). Directory watchers
compare listings (see "directory watchers" below).

Everything runs as the sandbox's one user (``user``, home /home/user): ``root`` is refused by name."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import posixpath
import secrets
import signal as signals
import stat
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from ...errors import FilesystemError, PolicyError, StockadeError
from ...sdk.models import CommandResult
from . import SANDBOX_PREFIX
from .connect import (
    ConnectError,
    end_stream,
    envelope,
    first_request,
    from_stockade,
    stream_requests,
    timeout_of,
    unary_error,
    unary_request,
)
from .core import ENVD_PORT, INTERPRETER_PORT, Core, E2BSandbox, SandboxGone, core_of

HOME = "/home/user"
USER = "user"
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGINT": 2, "SIGNAL_SIGHUP": 1}
SIGNAL_WORDS = {1: "hangup", 2: "interrupt", 9: "killed", 15: "terminated"}
FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
UNSUPPORTED: dict[tuple[str, str], str] = {}
WATCH_INTERVAL = 0.5      # a WatchDir stream lists the directory this often
GUNZIP_STEP = 1 << 20     # bytes a gzip-encoded upload inflates to per step, before the cap sees them
MAX_WATCHERS = 16         # per sandbox

router = APIRouter(prefix=SANDBOX_PREFIX, include_in_schema=False)


@dataclass
class Proc:
    pid: int
    config: dict[str, Any]
    tag: str | None
    listeners: set[asyncio.Queue[tuple[str, Any]]]
    end: dict[str, Any] | None = None
    timed_out: bool = False
    pty: bool = False  # on a terminal: its output is data.pty, its input input.pty
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


# ---- who is asking ------------------------------------------------------------------------------------
def _port(request: Request) -> int:
    raw = request.headers.get("e2b-sandbox-port", "")
    if not raw.isdigit():
        raise ConnectError("invalid_argument", "the E2b-Sandbox-Port header is missing (set E2B_SANDBOX_URL, "
                                               "or use the {port}-{sandboxID}.{domain} host form)")
    return int(raw)


async def _envd(request: Request, signed: str | None = None) -> tuple[Core, E2BSandbox]:
    """The request's sandbox, by its envd token, or for ``/files`` (``signed`` = the operation) by the
    signature of a download_url()/upload_url() when it carries one."""
    core = core_of(request)
    if signed is not None and "signature" in request.query_params and "x-access-token" not in request.headers:
        try:
            return core, await core.signed(request, request.headers.get("e2b-sandbox-id", ""),
                                     request.query_params.get("path", ""), signed)
        except SandboxGone as exc:
            raise ConnectError("unavailable", str(exc)) from None
    port = _port(request)
    if port != ENVD_PORT:
        raise ConnectError("unimplemented", f"port {port} does not serve envd (it is on {ENVD_PORT})")
    try:
        return core, await core.data_plane(request, request.headers.get("e2b-sandbox-id", ""), port)
    except SandboxGone as exc:
        raise ConnectError("unavailable", str(exc)) from None


def _user(name: str | None, where: str = "user") -> None:
    if name not in (None, "", USER):
        raise PolicyError(where, f"stockade runs everything as the sandbox's one user ({USER!r}); {name!r} is not "
                                 "available")


def _basic_user(request: Request) -> None:
    """envd's ``Authorization: Basic base64(user:)`` names the user a process or file call runs as."""
    header = request.headers.get("authorization", "")
    if header[:6].lower() == "basic ":
        try:
            user = base64.b64decode(header[6:].strip()).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            raise ConnectError("invalid_argument", "the Authorization header is not valid Basic") from None
        _user(user)


# ---- Connect RPC ----------------------------------------------------------------------------------------
@router.post("/process.Process/{method}")
async def process_rpc(method: str, request: Request) -> Response:
    return await _rpc("process.Process", method, request)


@router.post("/filesystem.Filesystem/{method}")
async def filesystem_rpc(method: str, request: Request) -> Response:
    return await _rpc("filesystem.Filesystem", method, request)


STREAMS = {("process.Process", "Start"), ("process.Process", "Connect"), ("filesystem.Filesystem", "WatchDir")}


async def _rpc(service: str, method: str, request: Request) -> Response:
    streaming = (service, method) in STREAMS
    try:
        core, e2b = await _envd(request)
        _basic_user(request)
        if (service, method) in UNSUPPORTED:
            raise ConnectError("unimplemented", f"{UNSUPPORTED[service, method]} is not supported by stockade")
        if streaming:
            msg = await first_request(request)
            if method == "WatchDir":
                watcher = await _watcher(core, e2b, msg)
                return StreamingResponse(_watch_stream(core, e2b, request, watcher),
                                         media_type="application/connect+json", headers=STREAM_HEADERS)
            opened = await (_start(core, e2b, request, msg) if method == "Start" else _connect(core, e2b, msg))
            return StreamingResponse(_stream(core, request, *opened), media_type="application/connect+json",
                                     headers=STREAM_HEADERS)
        if (service, method) == ("process.Process", "StreamInput"):
            await _stream_input(core, e2b, request)
            return Response(envelope({}) + end_stream(), media_type="application/connect+json")
        handler = UNARY.get((service, method))
        if handler is None:
            raise ConnectError("unimplemented", f"{service}/{method} does not exist")
        return JSONResponse(await handler(core, e2b, await unary_request(request)))
    except (ConnectError, StockadeError, OSError) as exc:
        return _rpc_error(request, streaming, exc)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a message of the wrong shape
        return _rpc_error(request, streaming, ConnectError("invalid_argument", f"malformed request message: {exc}"))


def _rpc_error(request: Request, streaming: bool, exc: Exception) -> Response:
    err = from_stockade(exc)
    if streaming or request.headers.get("content-type", "").startswith("application/connect+"):
        return Response(end_stream(err), media_type="application/connect+json")
    retry = getattr(exc, "retry_after", None)
    return unary_error(err, {"Retry-After": str(max(1, round(retry)))} if retry else None)


# ---- processes ------------------------------------------------------------------------------------------
def _table(core: Core, e2b: E2BSandbox) -> dict[int, Proc]:
    return core.processes.setdefault(e2b.id, {})


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConnectError("invalid_argument", f"{name} must be a list of strings")
    return value


def _end_event(result: CommandResult) -> dict[str, Any]:
    """envd's end event from the core's result (whose exit_code is minus the signal that killed it)."""
    exited = result.exit_code >= 0
    sig = -result.exit_code
    status = f"exit status {result.exit_code}" if exited else f"signal: {SIGNAL_WORDS.get(sig, str(sig))}"
    end: dict[str, Any] = {"exitCode": result.exit_code if exited else -1, "exited": exited, "status": status}
    if result.error:
        end["error"] = result.error
    return end


def _pty_size(pty: Any) -> tuple[int, int]:
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        raise ConnectError("invalid_argument", "pty.size must give rows and cols")
    rows, cols = size.get("rows"), size.get("cols")
    if not isinstance(rows, int) or not isinstance(cols, int) or isinstance(rows, bool) or isinstance(cols, bool):
        raise ConnectError("invalid_argument", "pty.size.rows and pty.size.cols must be whole numbers")
    return rows, cols  # their range is the manager's to check (PolicyError -> invalid_argument)


async def _start(core: Core, e2b: E2BSandbox, request: Request, msg: dict[str, Any]) -> tuple[Proc, Any]:
    pty = _pty_size(msg["pty"]) if msg.get("pty") else None
    config = msg.get("process")
    if not isinstance(config, dict) or not isinstance(config.get("cmd"), str) or not config["cmd"]:
        raise ConnectError("invalid_argument", "process.cmd must be a non-empty string")
    args = _str_list(config.get("args"), "process.args")
    envs = config.get("envs") or {}
    if not isinstance(envs, dict):
        raise ConnectError("invalid_argument", "process.envs must be an object of strings")
    cwd = config.get("cwd") or None
    if cwd is not None and not isinstance(cwd, str):
        raise ConnectError("invalid_argument", "process.cwd must be a string")
    tag = msg.get("tag") if isinstance(msg.get("tag"), str) else None
    listeners: set[asyncio.Queue[tuple[str, Any]]] = set()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    listeners.add(queue)

    def on_output(stream: str, data: bytes) -> None:
        for q in list(listeners):
            q.put_nowait(("data", (stream, data)))

    record = await core.start_command(e2b.id, [config["cmd"], *args], envs=envs, cwd=cwd,
                                      stdin_open=bool(msg.get("stdin")), timeout=timeout_of(request),
                                      on_output=on_output, pty=pty)
    proc = Proc(record.pid, {"cmd": config["cmd"], "args": args, "envs": envs, **({"cwd": cwd} if cwd else {})},
                tag, listeners, pty=pty is not None)
    table = _table(core, e2b)
    table[proc.pid] = proc

    async def wait() -> None:
        try:
            result = await core.result_of(e2b.id, record)
        except Exception as exc:  # noqa: BLE001 - the sandbox ended under it: the stream still ends
            result = CommandResult("", "", -9, error=str(exc)[:500])
        proc.timed_out = result.timed_out
        proc.end = _end_event(result)
        table.pop(proc.pid, None)
        for q in list(listeners):
            q.put_nowait(("end", None))

    task = asyncio.get_running_loop().create_task(wait())
    proc.tasks.add(task)  # held here: the process outlives the request that started it
    task.add_done_callback(proc.tasks.discard)
    return proc, queue


def _select(core: Core, e2b: E2BSandbox, selector: Any) -> int:
    if not isinstance(selector, dict):
        raise ConnectError("invalid_argument", "process must select a pid or a tag")
    if "pid" in selector:
        pid = selector["pid"]
        if isinstance(pid, str) and pid.isdigit():
            pid = int(pid)
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 22:
            raise ConnectError("invalid_argument", "process.pid must be a process id")
        return pid
    tag = selector.get("tag")
    for proc in _table(core, e2b).values():
        if isinstance(tag, str) and proc.tag == tag:
            return proc.pid
    raise ConnectError("not_found", f"no running process has the tag {str(tag)[:100]!r}")


async def _connect(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> tuple[Proc, Any]:
    pid = _select(core, e2b, msg.get("process"))
    proc = _table(core, e2b).get(pid)
    if proc is None:
        raise ConnectError("not_found", f"process with pid {pid} not found (only processes started through the "
                                        "E2B API can be connected to)")
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    proc.listeners.add(queue)
    if proc.end is not None:
        queue.put_nowait(("end", None))
    return proc, queue


async def _stream(core: Core, request: Request, proc: Proc, queue: asyncio.Queue[tuple[str, Any]]
                  ) -> AsyncIterator[bytes]:
    ping = request.headers.get("keepalive-ping-interval", "")
    interval = min(max(int(ping), 1), 3600) if ping.isdigit() else None
    try:
        yield envelope({"event": {"start": {"pid": proc.pid}}})
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield envelope({"event": {"keepalive": {}}})
                continue
            if kind == "data":
                stream, data = item
                yield envelope({"event": {"data": {"pty" if proc.pty else stream: base64.b64encode(data).decode()}}})
                continue
            await core.commit()  # the command's end is in the audit log before the caller learns it
            if proc.timed_out:
                yield end_stream(ConnectError("deadline_exceeded", (proc.end or {}).get("error", "timed out")))
            else:
                yield envelope({"event": {"end": proc.end}}) + end_stream()
            return
    finally:
        proc.listeners.discard(queue)


async def _list(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    table = _table(core, e2b)
    out = []
    for p in await core.process_list(e2b.id):
        known = table.get(p.pid)
        if known is not None:
            out.append({"pid": known.pid, "config": known.config, **({"tag": known.tag} if known.tag else {})})
        else:
            out.append({"pid": p.pid, "config": {"cmd": p.cmd}})
    return {"processes": out}


def _stdin(core: Core, e2b: E2BSandbox, pid: int, value: Any) -> bytes:
    """The bytes of a ProcessInput: ``pty`` for a process on a terminal, ``stdin`` for any other (as envd:
    a terminal has no stdin pipe, and a pipe is no terminal)."""
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", "input must be an object")
    kind = "pty" if "pty" in value else "stdin"
    known = _table(core, e2b).get(pid)
    if known is not None and known.pty != (kind == "pty"):
        raise ConnectError("failed_precondition", f"process {pid} is {'' if known.pty else 'not '}on a terminal: "
                                                  f"send input.{'pty' if known.pty else 'stdin'}")
    try:
        return base64.b64decode(str(value.get(kind, "")), validate=True)
    except binascii.Error:
        raise ConnectError("invalid_argument", f"input.{kind} must be base64") from None


async def _send_input(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    pid = _select(core, e2b, msg.get("process"))
    await core.send_stdin(e2b.id, pid, _stdin(core, e2b, pid, msg.get("input")))
    return {}


async def _update(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    """Update: a pty process's new size (the only thing envd's Update changes)."""
    pid = _select(core, e2b, msg.get("process"))
    if not msg.get("pty"):
        return {}
    rows, cols = _pty_size(msg["pty"])
    if not await core.resize(e2b.id, pid, rows, cols):
        raise ConnectError("not_found", f"process with pid {pid} not found")
    return {}


async def _stream_input(core: Core, e2b: E2BSandbox, request: Request) -> None:
    pid: int | None = None
    async for msg in stream_requests(request):
        event: dict[str, Any] = msg["event"] if isinstance(msg.get("event"), dict) else msg
        if "start" in event:
            pid = _select(core, e2b, (event["start"] or {}).get("process"))
        elif "data" in event:
            if pid is None:
                raise ConnectError("invalid_argument", "the stream must start with a start event naming the process")
            await core.send_stdin(e2b.id, pid, _stdin(core, e2b, pid, (event["data"] or {}).get("input")))


async def _close_stdin(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    await core.send_stdin(e2b.id, _select(core, e2b, msg.get("process")), b"", eof=True)
    return {}


async def _send_signal(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    pid = _select(core, e2b, msg.get("process"))
    raw = msg.get("signal")
    sig = SIGNALS.get(raw) if isinstance(raw, str) else raw
    if not isinstance(sig, int) or isinstance(sig, bool) or sig not in signals.valid_signals():
        raise ConnectError("invalid_argument", f"signal {str(raw)[:40]!r} is not one of {', '.join(SIGNALS)}")
    if not await core.signal(e2b.id, pid, sig):
        raise ConnectError("not_found", f"process with pid {pid} not found")
    return {}


# ---- filesystem -----------------------------------------------------------------------------------------
def _path(msg: dict[str, Any], key: str = "path") -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise ConnectError("invalid_argument", f"{key} must be a non-empty path")
    return value


def _entry(raw: dict[str, Any]) -> dict[str, Any]:
    kind = str(raw.get("type"))
    mode, mtime = raw.get("mode"), raw.get("mtime")
    mode = mode if isinstance(mode, int) else 0
    mtime = float(mtime) if isinstance(mtime, int | float) else 0.0
    return {"name": str(raw.get("name", "")), "type": FILE_TYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
            "path": str(raw.get("path", "")), "size": str(int(raw.get("size") or 0)), "mode": mode,
            "permissions": stat.filemode(TYPE_BITS.get(kind, 0) | mode), "owner": USER, "group": USER,
            "modifiedTime": datetime.datetime.fromtimestamp(mtime, datetime.UTC).isoformat().replace("+00:00", "Z")}


async def _stat(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    result = await core.file_op(e2b.id, "stat", path=_path(msg))
    return {"entry": _entry(result.get("entry") or {})}


async def _list_dir(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    path = _path(msg)
    depth = msg.get("depth") or 1
    if not isinstance(depth, int) or not 1 <= depth <= 32:
        raise ConnectError("invalid_argument", "depth must be between 1 and 32")
    info = await core.file_op(e2b.id, "stat", path=path)
    if (info.get("entry") or {}).get("type") != "dir":
        raise ConnectError("invalid_argument", f"path {path} is not a directory")
    result = await core.file_op(e2b.id, "list", path=path, depth=depth)
    return {"entries": [_entry(e) for e in result.get("entries") or [] if isinstance(e, dict)]}


async def _make_dir(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    path = _path(msg)
    result = await core.file_op(e2b.id, "mkdir", path=path)
    if not result.get("created"):
        raise ConnectError("already_exists", f"directory {path} already exists")
    return {"entry": (await _stat(core, e2b, {"path": path}))["entry"]}


async def _move(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    src, dst = _path(msg, "source"), _path(msg, "destination")
    await core.file_op(e2b.id, "rename", src=src, dst=dst)
    return {"entry": (await _stat(core, e2b, {"path": dst}))["entry"]}


async def _remove(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    await core.file_op(e2b.id, "remove", path=_path(msg))
    return {}


# ---- directory watchers: by comparing listings -----------------------------------------------------------
# The agent has no inotify (it would hand the host events named by the sandbox, and inotify watches are a
# host-wide resource): a watcher lists the directory and reports what changed since the last listing.
# So a file created and removed between two looks is not seen, and a rename is a remove and a create.
@dataclass
class Watcher:
    id: str
    path: str
    recursive: bool
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)


async def _snapshot(core: Core, e2b: E2BSandbox, w: Watcher) -> dict[str, tuple[Any, ...]]:
    result = await core.file_op(e2b.id, "list", path=w.path, depth=32 if w.recursive else 1)
    root = str((await core.file_op(e2b.id, "stat", path=w.path)).get("entry", {}).get("path", ""))
    out = {}
    for e in result.get("entries") or []:
        if isinstance(e, dict) and isinstance(e.get("path"), str):
            out[posixpath.relpath(e["path"], root)] = (e.get("type"), e.get("size"), e.get("mtime"), e.get("mode"))
    return out


def _changes(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    events = []
    for name, now in after.items():
        was = before.get(name)
        if was is None:
            events.append({"name": name, "type": "EVENT_TYPE_CREATE"})
        elif was[:3] != now[:3] and now[0] != "dir":
            events.append({"name": name, "type": "EVENT_TYPE_WRITE"})
        elif was[3] != now[3]:
            events.append({"name": name, "type": "EVENT_TYPE_CHMOD"})
    events += [{"name": name, "type": "EVENT_TYPE_REMOVE"} for name in before if name not in after]
    return events


async def _watcher(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> Watcher:
    if msg.get("includeEntry"):
        raise ConnectError("unimplemented", "watch events with entries (include_entry) are not supported")
    path = _path(msg)
    info = await core.file_op(e2b.id, "stat", path=path)
    if (info.get("entry") or {}).get("type") != "dir":
        raise ConnectError("invalid_argument", f"path {path} is not a directory")
    watchers = core.watchers.setdefault(e2b.id, {})
    if len(watchers) >= MAX_WATCHERS:
        raise ConnectError("resource_exhausted", f"a sandbox may have {MAX_WATCHERS} directory watchers")
    w = Watcher("w-" + secrets.token_hex(8), path, bool(msg.get("recursive")))
    w.seen = await _snapshot(core, e2b, w)
    return w


async def _create_watcher(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    w = await _watcher(core, e2b, msg)
    core.watchers.setdefault(e2b.id, {})[w.id] = w
    return {"watcherId": w.id}


def _watcher_of(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> Watcher:
    w: Watcher | None = core.watchers.get(e2b.id, {}).get(str(msg.get("watcherId", "")))
    if w is None:
        raise ConnectError("not_found", f"watcher {str(msg.get('watcherId'))[:40]!r} not found")
    return w


async def _watcher_events(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    w = _watcher_of(core, e2b, msg)
    now = await _snapshot(core, e2b, w)
    events, w.seen = _changes(w.seen, now), now
    return {"events": events}


async def _remove_watcher(core: Core, e2b: E2BSandbox, msg: dict[str, Any]) -> dict[str, Any]:
    w = _watcher_of(core, e2b, msg)
    core.watchers.get(e2b.id, {}).pop(w.id, None)
    return {}


async def _watch_stream(core: Core, e2b: E2BSandbox, request: Request, w: Watcher) -> AsyncIterator[bytes]:
    deadline = timeout_of(request)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline if deadline is not None else None
    watchers = core.watchers.setdefault(e2b.id, {})
    watchers[w.id] = w  # counted against MAX_WATCHERS while it streams
    try:
        yield envelope({"start": {}})
        last = loop.time()
        while end is None or loop.time() < end:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                now = await _snapshot(core, e2b, w)
            except (StockadeError, OSError) as exc:
                yield end_stream(from_stockade(exc))
                return
            events, w.seen = _changes(w.seen, now), now
            for event in events:
                yield envelope({"filesystem": event})
            if events:
                last = loop.time()
            elif loop.time() - last > 30:
                yield envelope({"keepalive": {}})
                last = loop.time()
        yield end_stream(ConnectError("deadline_exceeded", "the watch reached its timeout"))
    finally:
        watchers.pop(w.id, None)


Handler = Callable[[Core, E2BSandbox, dict[str, Any]], Awaitable[dict[str, Any]]]
UNARY: dict[tuple[str, str], Handler] = {
    ("process.Process", "List"): _list,
    ("process.Process", "SendInput"): _send_input,
    ("process.Process", "CloseStdin"): _close_stdin,
    ("process.Process", "SendSignal"): _send_signal,
    ("process.Process", "Update"): _update,
    ("filesystem.Filesystem", "Stat"): _stat,
    ("filesystem.Filesystem", "ListDir"): _list_dir,
    ("filesystem.Filesystem", "MakeDir"): _make_dir,
    ("filesystem.Filesystem", "Move"): _move,
    ("filesystem.Filesystem", "Remove"): _remove,
    ("filesystem.Filesystem", "CreateWatcher"): _create_watcher,
    ("filesystem.Filesystem", "GetWatcherEvents"): _watcher_events,
    ("filesystem.Filesystem", "RemoveWatcher"): _remove_watcher,
}


# ---- /files and /health ---------------------------------------------------------------------------------
FILE_STATUS = {"ENOENT": 404, "ENOSPC": 507, "EDQUOT": 507, "EACCES": 403, "EPERM": 403}


def envd_error(status: int, message: str) -> JSONResponse:
    """envd's HTTP errors: ``{"code": status, "message": ...}``."""
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _file_error(exc: BaseException) -> JSONResponse:
    if isinstance(exc, SandboxGone | ConnectError) and (not isinstance(exc, ConnectError)
                                                        or exc.code == "unavailable"):
        return envd_error(502, str(exc))
    if isinstance(exc, FilesystemError):
        return envd_error(FILE_STATUS.get(exc.errno_name, 400), str(exc))
    if isinstance(exc, ConnectError):
        from .connect import HTTP_STATUS

        return envd_error(HTTP_STATUS[exc.code], exc.message)
    if isinstance(exc, StockadeError):
        from ...errors import to_wire

        return envd_error(to_wire(exc)[0], str(exc))
    raise exc


def _absolute(path: str) -> str:
    return posixpath.normpath(posixpath.join(HOME, path))


class TooLarge(Exception):
    pass


@router.get("/files")
async def download(request: Request, path: str = "", username: str | None = None) -> Response:
    try:
        core, e2b = await _envd(request, signed="read")
        _user(username, "username")
        if not path:
            raise PolicyError("path", "is required")
        info = await core.file_op(e2b.id, "stat", path=path)
        entry = info.get("entry") or {}
        if entry.get("type") == "dir":
            return envd_error(400, f"path {path} is a directory")
        size = entry.get("size", 0)
        if isinstance(size, int) and size > core.max_upload:
            return envd_error(413, f"{path} is {size} bytes, over the server's max_upload ({core.max_upload})")
        chunks = await core.open_read(e2b.id, path)
    except (ConnectError, StockadeError, SandboxGone) as exc:
        return _file_error(exc)
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.post("/files")
async def upload(request: Request, path: str | None = None, username: str | None = None) -> Response:
    """``application/octet-stream`` (one file, at ``path``) or ``multipart/form-data`` (each ``file`` part
    at ``path`` when it is the only one, else at its filename): the SDKs' write() and write_files()."""
    try:
        core, e2b = await _envd(request, signed="write")
        _user(username, "username")
        encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
        if encoding not in ("identity", "gzip"):
            raise PolicyError("Content-Encoding", f"{encoding!r} is not supported (identity or gzip)")
        cap = core.max_upload
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            if encoding == "gzip":  # what the SDKs never send: gzip=True implies an octet-stream upload
                raise PolicyError("Content-Encoding", "gzip applies to octet-stream uploads only")
            written = await _multipart(core, e2b, request, path, cap)
        else:
            if not path:
                raise PolicyError("path", "is required for an octet-stream upload")
            body = request.stream()
            # max_upload bounds what is written, so a gzip bomb stops there
            await _write(core, e2b, path, _capped(_gunzip(body) if encoding == "gzip" else body, cap))
            written = [path]
    except TooLarge:
        return envd_error(413, f"the upload is over the server's max_upload ({core.max_upload} bytes)")
    except BadGzip as exc:
        return envd_error(400, f"the gzip-encoded upload is not valid gzip: {exc}")
    except (ConnectError, StockadeError, SandboxGone) as exc:
        return _file_error(exc)
    return JSONResponse([{"name": posixpath.basename(_absolute(p)), "type": "file", "path": _absolute(p)}
                         for p in written])


class BadGzip(Exception):
    pass


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The decoded body, at most GUNZIP_STEP bytes per step (a small body may inflate a thousandfold: the
    caller's cap sees each step before the next is made). One gzip member, nothing after it."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                if d.eof:
                    raise BadGzip("data after the end of the gzip stream")
                out = d.decompress(data, GUNZIP_STEP)
                if d.unused_data:  # bytes past the member's end, in this chunk
                    raise BadGzip("data after the end of the gzip stream")
                data = d.unconsumed_tail
                if out:
                    yield out
        if not d.eof:
            raise BadGzip("the gzip stream is truncated")
    except zlib.error as exc:
        raise BadGzip(str(exc)) from None


async def _capped(chunks: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > cap:
            raise TooLarge()
        yield chunk


async def _write(core: Core, e2b: E2BSandbox, path: str, chunks: AsyncIterator[bytes]) -> None:
    try:
        await core.write(e2b.id, path, chunks)
    except (TooLarge, BadGzip):
        with contextlib.suppress(StockadeError):  # nothing of an oversized upload is kept
            await core.file_op(e2b.id, "remove", path=path)
        raise


async def _multipart(core: Core, e2b: E2BSandbox, request: Request, path: str | None, cap: int) -> list[str]:
    seen = 0
    receive = request.receive

    async def counted() -> Any:  # the whole body counts against max_upload, before it is spooled
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > cap:
            raise TooLarge()
        return message

    form = await Request(request.scope, counted).form(max_files=1000, max_fields=1000)
    try:
        parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not parts:
            raise PolicyError("file", "the multipart body has no file part")
        written = []
        for part in parts:
            target = path if path and len(parts) == 1 else part.filename
            if not target:
                raise PolicyError("file", "a part without a filename needs the path parameter")

            async def chunks(f: UploadFile = part) -> AsyncIterator[bytes]:
                while data := await f.read(1 << 20):
                    yield data

            await _write(core, e2b, target, chunks())
            written.append(target)
        return written
    finally:
        await form.close()


@router.get("/health")
async def health(request: Request) -> Response:
    """204 while the sandbox runs, 502 "not found" otherwise (the SDK's is_running())."""
    core = core_of(request)
    try:
        port = _port(request)
        if port not in (ENVD_PORT, INTERPRETER_PORT):
            raise SandboxGone(request.headers.get("e2b-sandbox-id", ""))
        await core.data_plane(request, request.headers.get("e2b-sandbox-id", ""), port)
    except (SandboxGone, ConnectError) as exc:
        return envd_error(502, str(exc))
    except StockadeError as exc:
        return _file_error(exc)
    return Response(status_code=204)

