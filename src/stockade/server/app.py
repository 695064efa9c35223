"""The HTTP API: FastAPI routes over one Manager, for many tenants.

Every route but /health and /metrics needs an API key (``Authorization: Bearer sk_...`` or
``X-API-Key``). A sandbox of another tenant is answered exactly like one that never existed (404).
Errors are JSON ``{code, message}`` with a 4xx/5xx status. Streams (command output, code cells) are
server-sent events whose data are JSON objects; bytes travel base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..artifacts import ArtifactError
from ..audit import AuditEvent, SQLAudit
from ..audit.events import EventFilter
from ..config import HostConfig
from ..core.build import build_manager
from ..core.manager import Manager
from ..core.sandboxes import ManagedSandbox, new_sandbox_id
from ..db import engine_for
from ..errors import (
    AuthenticationError,
    ConflictError,
    FilesystemError,
    PolicyError,
    QuotaError,
    RequestError,
    SandboxNotFoundError,
    StockadeError,
    to_wire,
)
from ..policy import Policy
from ..pool import WarmPool
from ..runtime.base import Runtime
from .auth import KeyStore, Principal, RateLimiter
from .e2b import E2B_UPLOAD
from .e2b import mount as mount_e2b
from .metrics import MeteredAudit, Metrics
from .registry import Registry
from .settings import ServerSettings

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class Server:
    """What one running server holds: settings, database, keys, the manager and its sandboxes."""

    def __init__(self, settings: ServerSettings, config: HostConfig, runtime: Runtime | None = None) -> None:
        self.settings, self.config = settings, config
        self.run_id = secrets.token_hex(8)
        self.engine = engine_for(settings.database_url, config.data_dir)
        self.keys = KeyStore(self.engine)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.registry = Registry(self.engine, self.run_id)
        self._runtime = runtime
        self.manager: Manager | None = None
        self.audit = MeteredAudit(SQLAudit(self.engine), self.metrics)
        self.metrics.watch(self.audit)
        self._pruner: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()   # database writes in flight

    async def start(self) -> None:
        # the runtimes first remove what an earlier run that was killed left on the host
        config = self.config
        if self.settings.runtime:
            config = dataclasses.replace(config, runtime=self.settings.runtime)
        manager = await build_manager(config, runtime=self._runtime, audit=self.audit,
                                      runtimes=self.settings.runtimes, output_recorded=self.settings.audit_output)
        await asyncio.to_thread(self.registry.recover, self.audit)
        manager.on_end = self._ended
        if self.settings.warm_pool:
            manager.pool = WarmPool(manager.runtime, Policy.from_dict(self.settings.warm_pool_policy),
                                    self.settings.warm_pool, new_sandbox_id)
            manager.pool.start()
        self.manager = manager
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever())

    def _ended(self, sb: ManagedSandbox, reason: str) -> None:
        self.registry.release(sb.id)  # its quota is free at once; the row is closed off the loop
        self.metrics.alive.set(len(self.registry.live))
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.registry.ended, sb.id, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _prune_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.audit.prune, time.time() - self.settings.audit_retention)
            cap, store = self.settings.audit_max_size, self.audit.inner
            if cap is not None and isinstance(store, SQLAudit):
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(store.prune_to_size, cap)
            await asyncio.sleep(self.settings.reaper_interval or 3600)

    async def stop(self) -> None:
        """Graceful: every sandbox is killed (they never outlive the server) and the audit log flushed."""
        if self._pruner is not None:
            self._pruner.cancel()
        if self.manager is not None:
            await self.manager.shutdown()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.to_thread(self.audit.close)
        self.engine.dispose()

    @property
    def m(self) -> Manager:
        assert self.manager is not None, "the server has not started"
        return self.manager


# ---- request and response bodies ------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Name = Annotated[str, Field(min_length=1, max_length=256)]
Envs = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=1 << 16)]]


class CreateSandbox(_Body):
    policy: dict[str, Any] | None = None
    timeout: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None
    envs: Envs | None = None
    metadata: dict[Name, Annotated[str, Field(max_length=4096)]] | None = None
    user_id: Name | None = None
    runtime: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="the runtime to run on (server settings runtime and runtimes); default: the server's")


class SandboxOut(BaseModel):
    sandbox_id: str
    state: Literal["running", "ended"]
    started_at: float
    end_at: float | None
    metadata: dict[str, str]
    user_id: str | None
    policy: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    end_reason: str | None = None


class SetTimeout(_Body):
    timeout: Annotated[float, Field(gt=0, le=10 * 365 * 86400)]


class RunCommand(_Body):
    cmd: Annotated[str, Field(max_length=1 << 20)] | None = None
    argv: Annotated[list[Annotated[str, Field(max_length=1 << 16)]], Field(max_length=4096)] | None = None
    envs: Envs | None = None
    cwd: Annotated[str, Field(max_length=4096)] | None = None
    stdin: str | None = Field(None, description="base64 of the bytes to feed to stdin")
    timeout: float | None = None
    background: bool = False


class CommandOut(BaseModel):
    pid: int
    exit_code: int | None = Field(description="null while running: a background start answers at once")
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    running: bool = False
    limit: str | None = None    # the policy field whose limit the command hit
    error: str | None = None    # what happened, in words


class SignalBody(_Body):
    signal: Annotated[int, Field(ge=1, le=64)] = 9


class FileOpBody(_Body):
    path: Annotated[str, Field(max_length=4096)] | None = None
    depth: Annotated[int, Field(ge=1, le=64)] | None = None
    src: Annotated[str, Field(max_length=4096)] | None = None
    dst: Annotated[str, Field(max_length=4096)] | None = None


class RunCode(_Body):
    code: Annotated[str, Field(max_length=1 << 20)]
    language: Literal["python", "bash", "javascript"] = "python"
    context_id: Annotated[str, Field(max_length=64)] | None = None
    envs: Envs | None = None
    timeout: float | None = None


class CreateContext(_Body):
    language: Literal["python", "bash", "javascript"] = "python"
    cwd: Annotated[str, Field(max_length=4096)] | None = None


class ContextOut(BaseModel):
    id: str
    language: str
    cwd: str
    backend: str


class ErrorOut(BaseModel):
    code: str
    message: str


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut}
                                           for s in (400, 401, 404, 409, 413, 422, 429, 502, 503, 504)}


# ---- shared by the native routes and the E2B front end (server/e2b/) ---------------------------------
def live_sandbox(srv: Server, who: Principal, sandbox_id: str) -> ManagedSandbox:
    """The caller's live sandbox; another tenant's is answered exactly like one that never existed."""
    owned = srv.registry.live.get(sandbox_id)
    if owned is None or owned.tenant != who.tenant or not owned.ready:
        row = srv.registry.owner_of(who.tenant, sandbox_id)  # raises not-found for strangers
        raise SandboxNotFoundError(f"sandbox {sandbox_id!r} has ended: {row.get('end_reason') or 'ended'}")
    return srv.m.get(sandbox_id)


async def create_sandbox(srv: Server, who: Principal, policy: Policy, timeout: float | None,
                         envs: dict[str, str] | None, metadata: dict[str, str] | None,
                         user_id: str | None, runtime: str | None = None) -> tuple[ManagedSandbox, bool]:
    """Create a sandbox for the caller through the tenant's gate, quota and one-per-user rule. Returns the
    sandbox and whether it is the user's existing one (one_sandbox_per_user = "reuse")."""
    limits = srv.settings.tenant(who.tenant)
    limits.check(policy)
    limits.check_runtime(runtime or srv.m.runtime.name)
    async with srv.registry.lock(who.tenant):
        existing = srv.registry.existing_for_user(who.tenant, user_id)
        if existing is not None and limits.one_sandbox_per_user != "off":
            if limits.one_sandbox_per_user == "reject" or not existing.ready:
                raise ConflictError(f"user {user_id!r} already has sandbox {existing.id} and this "
                                    "tenant allows one sandbox per user")
            return srv.m.get(existing.id), True
        try:
            srv.registry.check_quota(who.tenant, limits, policy)
        except QuotaError:
            srv.metrics.create_failures.labels("quota").inc()
            raise
        owned = srv.registry.reserve(who.tenant, user_id, policy)
    try:
        sb = await srv.m.create(policy, timeout, envs, metadata, tenant=who.tenant, user_id=user_id,
                                runtime=runtime)
    except BaseException as exc:
        srv.registry.release(owned.id)
        srv.metrics.create_failures.labels(type(exc).__name__[:40]).inc()
        raise
    srv.registry.assign(owned, sb.id)
    if sb.id not in srv.m.sandboxes:  # it died while being created: its quota is free, the caller told why
        srv.registry.release(sb.id)
        srv.m.get(sb.id)
    await asyncio.to_thread(srv.registry.started, owned, dict(sb.metadata))
    srv.metrics.creates.inc()
    srv.metrics.alive.set(len(srv.registry.live))
    return sb, False


# ---- the app ----------------------------------------------------------------------------------------
# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a cost on every request.
async def server_of(request: Request) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


async def principal(request: Request) -> Principal:
    srv: Server = request.app.state.server
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not key:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    found = srv.keys.cached(key) or await asyncio.to_thread(srv.keys.authenticate, key)
    if found is None:
        raise AuthenticationError("invalid or revoked API key")
    request.scope.setdefault("state", {})["principal"] = found
    tenant = srv.settings.tenant(found.tenant)
    releases = _releases(request.method, request.url.path)
    wait = 0.0 if releases else srv.limiter.allow(found.key_id, tenant.rate_limit, tenant.rate_burst)
    if wait:
        raise QuotaError(f"rate limit: this key may send {tenant.rate_limit:g} requests per second; "
                         f"retry in {wait:.2f}s", retry_after=wait)
    return found


def _releases(method: str, path: str) -> bool:
    """Requests that free resources (ending a sandbox or context, signalling a process) are never refused by
    the rate limiter or a failing audit store: refusing them would keep the sandbox running, and holding
    quota, until its timeout."""
    return method == "DELETE" or (method == "POST" and path.endswith(("/signal", "/process.Process/SendSignal")))


Auth = Annotated[Principal, Depends(principal)]
Srv = Annotated[Server, Depends(server_of)]


def create_app(settings: ServerSettings, config: HostConfig | None = None, runtime: Runtime | None = None) -> FastAPI:
    config = config or HostConfig.from_env()
    if settings.data_dir is not None:
        config = dataclasses.replace(config, data_dir=settings.data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = Server(settings, config, runtime)
        await server.start()
        app.state.server = server
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="stockade", version=__version__, lifespan=lifespan, responses=ERRORS,
                  description="Sandboxes for untrusted, AI-written code. Authenticate with "
                              "`Authorization: Bearer <API key>`.")
    _add_error_handlers(app)
    app.add_middleware(_Guard, max_body=settings.max_body)

    live = live_sandbox

    # ---- sandboxes --------------------------------------------------------------------------------
    @app.get("/health", tags=["server"])
    async def health(srv: Srv) -> dict[str, Any]:
        """``status`` is "degraded" while the audit log cannot be written (new work is refused then)."""
        pool = srv.m.pool
        audit = srv.audit
        return {"status": "ok" if audit.state == "ok" else "degraded", "version": __version__,
                "sandboxes": len(srv.m.sandboxes), "warm": len(pool.ready) if pool is not None else 0,
                "audit": {"state": audit.state, "error": audit.error, "held": audit.held}}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(srv: Srv) -> Response:
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/sandboxes", status_code=201, tags=["sandboxes"])
    async def create(body: CreateSandbox, srv: Srv, who: Auth, response: Response) -> SandboxOut:
        sb, reused = await create_sandbox(srv, who, Policy.from_dict(body.policy or {}), body.timeout, body.envs,
                                          body.metadata, body.user_id, body.runtime)
        if reused:
            response.status_code = 200
        return _out(srv, sb)

    @app.get("/sandboxes", tags=["sandboxes"])
    async def list_sandboxes(srv: Srv, who: Auth, state: Literal["running", "ended"] = "running",
                             metadata: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
                             user_id: str | None = None) -> list[SandboxOut]:
        want = dict(m.partition("=")[::2] for m in metadata or [])
        if state == "running":
            out = [_out(srv, srv.m.sandboxes[o.id]) for o in list(srv.registry.live.values())
                   if o.tenant == who.tenant and o.ready and o.id in srv.m.sandboxes]
        else:
            out = await asyncio.to_thread(_ended_rows, srv, who.tenant)
        return [o for o in out if all(o.metadata.get(k) == v for k, v in want.items())
                and (user_id is None or o.user_id == user_id)]

    @app.get("/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def get_sandbox(sandbox_id: str, srv: Srv, who: Auth) -> SandboxOut:
        return _out(srv, live(srv, who, sandbox_id))

    @app.delete("/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
    async def kill(sandbox_id: str, srv: Srv, who: Auth) -> Response:
        live(srv, who, sandbox_id)
        await srv.m.kill(sandbox_id)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: SetTimeout, srv: Srv, who: Auth) -> SandboxOut:
        live(srv, who, sandbox_id)
        srv.m.set_timeout(sandbox_id, body.timeout)
        return _out(srv, srv.m.get(sandbox_id))

    # ---- commands ---------------------------------------------------------------------------------
    @app.post("/sandboxes/{sandbox_id}/commands", tags=["commands"], response_model=CommandOut,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def run_command(sandbox_id: str, body: RunCommand, request: Request, srv: Srv, who: Auth) -> Any:
        live(srv, who, sandbox_id)
        if (body.cmd is None) == (body.argv is None):
            raise RequestError("give exactly one of cmd (a shell command line) or argv (a list)")
        stdin = _b64(body.stdin, "stdin") if body.stdin is not None else None
        streaming = "text/event-stream" in request.headers.get("accept", "")
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        started = time.perf_counter()
        record = await srv.m.start_command(
            sandbox_id, body.cmd if body.cmd is not None else body.argv or [], envs=body.envs, cwd=body.cwd,
            stdin=stdin, stdin_open=body.background and stdin is None, timeout=body.timeout,
            background=body.background, on_output=(lambda s, d: queue.put_nowait((s, d))) if streaming else None)

        async def finish() -> dict[str, Any]:
            exit_ = await srv.m.wait_command(sandbox_id, record)
            srv.metrics.exec_seconds.observe(time.perf_counter() - started)
            code, sig = exit_.get("code"), exit_.get("signal")
            return {"exit_code": code if isinstance(code, int) else -(sig if isinstance(sig, int) else 9),
                    "timed_out": bool(exit_.get("timed_out")), "truncated": any(record.pending.truncated.values()),
                    "limit": exit_.get("limit"), "error": exit_.get("error")}

        if not streaming and body.background:  # started: the caller follows it with signal/stdin/list
            return CommandOut(pid=record.pid, exit_code=None, stdout="", stderr="", timed_out=False, truncated=False,
                              running=True)
        if not streaming:
            done = await finish()
            out = record.pending.output
            return CommandOut(pid=record.pid, stdout=out["stdout"].decode("utf-8", "replace"),
                              stderr=out["stderr"].decode("utf-8", "replace"), **done)

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                yield _sse("start", {"pid": record.pid})
                waiter = asyncio.ensure_future(finish())
                async for kind, data in _as_they_come(queue, waiter):
                    yield _stream_event(kind, data)
                await srv.audit.commit()  # the command's record is in the audit log before its result goes out
                try:
                    yield _sse("exit", waiter.result())
                except StockadeError as exc:
                    yield _sse("error", to_wire(exc)[1])
                finished = True
            finally:
                if not finished and not body.background:  # the caller went away: its command goes too
                    with contextlib.suppress(Exception):
                        await srv.m.signal(sandbox_id, record.pid, 9)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/sandboxes/{sandbox_id}/commands", tags=["commands"])
    async def list_commands(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
        live(srv, who, sandbox_id)
        return [{"pid": p["pid"], "cmd": str(p.get("cmd", ""))[:4096],
                 "tag": p.get("tag") if isinstance(p.get("tag"), str) else None}
                for p in await srv.m.list_commands(sandbox_id)]

    @app.post("/sandboxes/{sandbox_id}/commands/kill", tags=["commands"])
    async def kill_all_commands(sandbox_id: str, srv: Srv, who: Auth) -> dict[str, int]:
        """Kill every process in the sandbox but its agent; the sandbox stays usable."""
        live(srv, who, sandbox_id)
        return {"killed": await srv.m.kill_all(sandbox_id)}

    @app.post("/sandboxes/{sandbox_id}/commands/{pid}/stdin", tags=["commands"], status_code=204,
              openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
    async def send_stdin(sandbox_id: str, pid: Annotated[int, PathParam(ge=1, le=1 << 22)], request: Request,
                         srv: Srv, who: Auth, eof: bool = False) -> Response:
        live(srv, who, sandbox_id)
        await srv.m.send_stdin(sandbox_id, pid, await request.body(), eof)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/commands/{pid}/signal", tags=["commands"])
    async def send_signal(sandbox_id: str, pid: Annotated[int, PathParam(ge=1, le=1 << 22)], body: SignalBody,
                          srv: Srv, who: Auth) -> dict[str, bool]:
        live(srv, who, sandbox_id)
        return {"delivered": await srv.m.signal(sandbox_id, pid, body.signal)}

    # ---- files ------------------------------------------------------------------------------------
    @app.get("/sandboxes/{sandbox_id}/files", tags=["files"], response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def download(sandbox_id: str, path: Annotated[str, Query(min_length=1, max_length=4096)],
                       srv: Srv, who: Auth) -> StreamingResponse:
        live(srv, who, sandbox_id)
        info = await srv.m.file_op(sandbox_id, "stat", path=path)
        size = info.get("entry", {}).get("size", 0) if isinstance(info.get("entry"), dict) else 0
        if isinstance(size, int) and size > srv.settings.max_upload:
            raise _TooLarge(f"{path} is {size} bytes, over the server's max_upload ({srv.settings.max_upload})")
        chunks = await srv.m.open_read(sandbox_id, path)  # a refusal is answered here, before the stream
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.put("/sandboxes/{sandbox_id}/files", tags=["files"],
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
    async def upload(sandbox_id: str, path: Annotated[str, Query(min_length=1, max_length=4096)], request: Request,
                     srv: Srv, who: Auth) -> dict[str, Any]:
        live(srv, who, sandbox_id)
        cap = srv.settings.max_upload
        over = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal over
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > cap:
                    over = True
                    return
                yield chunk

        size = await srv.m.write_chunks(sandbox_id, path, body())
        if over:
            with contextlib.suppress(FilesystemError):
                await srv.m.file_op(sandbox_id, "remove", path=path)
            raise _TooLarge(f"the upload is over the server's max_upload ({cap} bytes); nothing was kept")
        return {"path": path, "size": size}

    @app.post("/sandboxes/{sandbox_id}/files/{op}", tags=["files"])
    async def file_op(sandbox_id: str, op: Literal["stat", "list", "mkdir", "remove", "rename"], body: FileOpBody,
                      srv: Srv, who: Auth) -> dict[str, Any]:
        live(srv, who, sandbox_id)
        args = {k: v for k, v in body.model_dump().items() if v is not None}
        needed = ("src", "dst") if op == "rename" else ("path",)
        if not all(k in args for k in needed):
            raise RequestError(f"{op} needs {' and '.join(needed)}")
        return await srv.m.file_op(sandbox_id, op, **args)

    # ---- code interpreter -------------------------------------------------------------------------
    @app.post("/sandboxes/{sandbox_id}/code", tags=["code"], responses={200: {"content": {"text/event-stream": {}}}})
    async def run_code(sandbox_id: str, body: RunCode, srv: Srv, who: Auth) -> StreamingResponse:
        live(srv, who, sandbox_id)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        task = asyncio.ensure_future(srv.m.run_code(
            sandbox_id, body.code, language=body.language, context_id=body.context_id, envs=body.envs,
            timeout=body.timeout, on_output=lambda s, d: queue.put_nowait((s, d)),
            on_event=lambda e: queue.put_nowait(("event", e))))
        # errors before the cell starts (unknown context, bad timeout) are answered as errors, not streams
        await asyncio.wait({task, asyncio.ensure_future(asyncio.sleep(0.05))}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

        async def events() -> AsyncIterator[bytes]:
            try:
                async for kind, payload in _as_they_come(queue, task):
                    yield _stream_event(kind, payload)
                await srv.audit.commit()  # the cell's record is in the audit log before its result goes out
                try:
                    done, _ = task.result()
                    yield _sse("done", {k: v for k, v in done.items() if k != "id"})
                except StockadeError as exc:
                    yield _sse("error", to_wire(exc)[1])
            finally:
                if not task.done():
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/sandboxes/{sandbox_id}/contexts", status_code=201, tags=["code"])
    async def create_context(sandbox_id: str, body: CreateContext, srv: Srv, who: Auth) -> ContextOut:
        live(srv, who, sandbox_id)
        return _ctx(await srv.m.create_context(sandbox_id, body.language, body.cwd))

    @app.get("/sandboxes/{sandbox_id}/contexts", tags=["code"])
    async def list_contexts(sandbox_id: str, srv: Srv, who: Auth) -> list[ContextOut]:
        live(srv, who, sandbox_id)
        return [_ctx(c) for c in srv.m.list_contexts(sandbox_id)]

    @app.post("/sandboxes/{sandbox_id}/contexts/{context_id}/restart", tags=["code"])
    async def restart_context(sandbox_id: str, context_id: str, srv: Srv, who: Auth) -> ContextOut:
        live(srv, who, sandbox_id)
        return _ctx(await srv.m.restart_context(sandbox_id, context_id))

    @app.delete("/sandboxes/{sandbox_id}/contexts/{context_id}", status_code=204, tags=["code"])
    async def remove_context(sandbox_id: str, context_id: str, srv: Srv, who: Auth) -> Response:
        live(srv, who, sandbox_id)
        await srv.m.remove_context(sandbox_id, context_id)
        return Response(status_code=204)

    # ---- artifacts, network, audit ----------------------------------------------------------------
    @app.get("/sandboxes/{sandbox_id}/artifacts", tags=["artifacts"])
    async def list_artifacts(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
        await asyncio.to_thread(srv.registry.owner_of, who.tenant, sandbox_id)  # also after it ended
        return [{**dataclasses.asdict(a), "created_at": a.created_at.timestamp()}
                for a in srv.m.artifacts.list(sandbox_id)]

    @app.get("/sandboxes/{sandbox_id}/artifacts/{name}", tags=["artifacts"], response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def get_artifact(sandbox_id: str, name: str, srv: Srv, who: Auth) -> StreamingResponse:
        await asyncio.to_thread(srv.registry.owner_of, who.tenant, sandbox_id)
        path = srv.m.artifacts.open(sandbox_id, name)

        def chunks() -> Any:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.patch("/sandboxes/{sandbox_id}/network", tags=["network"])
    async def update_network(sandbox_id: str, body: dict[str, Any], srv: Srv, who: Auth) -> dict[str, Any]:
        sb = live(srv, who, sandbox_id)
        srv.settings.tenant(who.tenant).check(sb.policy.with_overrides(network=body))  # the same gate as create
        return srv.m.update_network(sandbox_id, body).model_dump()

    @app.get("/sandboxes/{sandbox_id}/network/events", tags=["network"])
    async def network_events(sandbox_id: str, srv: Srv, who: Auth) -> list[dict[str, Any]]:
        live(srv, who, sandbox_id)
        return srv.m.network_events(sandbox_id)

    @app.get("/events", tags=["audit"])
    async def events(srv: Srv, who: Auth, sandbox_id: str | None = None, user_id: str | None = None,
                     type: Annotated[str | None, Query(max_length=64)] = None,
                     since: float | None = None, until: float | None = None,
                     after_id: Annotated[int | None, Query(ge=0, le=1 << 62)] = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        """Audit events of your tenant only, oldest first. Page with ``after_id`` (the last id you saw).
        Queries of the audit log itself are recorded as ``audit.query`` and shown only when ``type`` asks for
        them (else paging would never reach the end: each page's request adds a record)."""
        await asyncio.to_thread(srv.audit.flush)
        flt = EventFilter(tenant=who.tenant, sandbox_id=sandbox_id, user_id=user_id, type=type, since=since,
                          until=until, after_id=after_id, limit=limit,
                          exclude_type=None if (type or "").startswith("audit") else "audit.query")
        return [e.to_dict() for e in await asyncio.to_thread(srv.audit.query, flt)]

    mount_e2b(app)  # E2B's wire protocol over the same checks (server/e2b/); its routing is outermost
    return app


# ---- helpers ----------------------------------------------------------------------------------------
def _out(srv: Server, sb: ManagedSandbox) -> SandboxOut:
    info = srv.m.info_of(sb)
    return SandboxOut(sandbox_id=sb.id, state=info.state, started_at=sb.started_at, end_at=info.end_at.timestamp(),
                      metadata=info.metadata, user_id=sb.user_id, policy=info.policy, runtime=info.runtime)


def _ended_rows(srv: Server, tenant: str) -> list[SandboxOut]:
    return [SandboxOut(sandbox_id=r["id"], state="ended", started_at=r["created"], end_at=r["ended"],
                       metadata=r["metadata"], user_id=r["user_id"], end_reason=r["end_reason"])
            for r in srv.registry.ended_rows(tenant)]


def _ctx(ctx: Any) -> ContextOut:
    return ContextOut(id=ctx.id, language=ctx.language, cwd=ctx.cwd, backend=ctx.backend)


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise PolicyError(field, "must be base64") from None


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream_event(kind: str, payload: Any) -> bytes:
    """Output (stdout, stderr: bytes, sent base64) or an interpreter event (already JSON)."""
    if kind == "event":
        return _sse("event", payload)
    return _sse(kind, {"b64": base64.b64encode(payload).decode()})


async def _as_they_come(queue: asyncio.Queue[tuple[str, Any]],
                        task: asyncio.Future[Any]) -> AsyncIterator[tuple[str, Any]]:
    """The queue's items as they arrive until ``task`` is done, then the ones still in it."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        yield getter.result()
    while not queue.empty():
        yield queue.get_nowait()


class _TooLarge(RequestError):
    pass


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def stockade_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StockadeError)
        if isinstance(exc, _TooLarge):
            return _error(413, "too_large", str(exc))
        status, body = to_wire(exc)
        if isinstance(exc, ArtifactError):
            status, body = 404, {"code": "artifact_error", "message": str(exc)}
        headers = {"Retry-After": str(math.ceil(exc.retry_after))} if isinstance(exc, QuotaError) and exc.retry_after \
            else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}" if where else
                      str(first.get("msg", "invalid request")))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return _error(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail),
                      dict(exc.headers) if exc.headers else None)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("stockade.server").exception("unhandled error on %s", request.url.path)
        return _error(500, "internal", "internal server error (logged on the server)")

    app.add_exception_handler(StockadeError, stockade_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


_UNGATED = ("/health", "/metrics")


class _Guard:
    """Pure ASGI middleware: caps request bodies (uploads excepted: their route counts), records every API
    call in the audit log with the tenant, key id, route template and status, and holds each answer until
    the request's records are committed (a result a client saw is in the audit log). While the audit log
    cannot be written, new work is refused with 503; ending sandboxes and processes still goes ahead."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        srv: Server | None = getattr(getattr(scope.get("app"), "state", None), "server", None)
        path, method = scope["path"], scope["method"]
        if srv is not None and srv.audit.state != "ok" and path not in _UNGATED and not _releases(method, path):
            srv.metrics.audit_refused.inc()
            await self._refuse(send, scope, started, 503, {
                "code": "audit_unavailable",
                "message": f"the audit log cannot be written ({srv.audit.error}); new work is refused until it "
                           f"can, so nothing runs unrecorded: free space in the server's data directory or fix "
                           f"its database (GET /health shows the audit store's state)"},
                [(b"retry-after", b"5")])
            return
        is_upload = (method == "PUT" and path.endswith("/files")) or (method == "POST" and path == E2B_UPLOAD)
        names = [name.lower() for name, _ in scope.get("headers") or []]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if b"transfer-encoding" in names and b"content-length" in names:
            # a front proxy and this server could disagree on where the body ends (request smuggling)
            await self._refuse(send, scope, started, 400, {"code": "invalid_request", "message": "a request may "
                               "not have both Content-Length and Transfer-Encoding"}, [(b"connection", b"close")])
            return
        too_large = {"code": "too_large", "message": f"request body over {self.max_body} bytes"}
        if not is_upload and length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._refuse(send, scope, started, 413, too_large, [(b"connection", b"close")])
            return
        if not is_upload:
            # Read the (small, JSON) body here: a body over the cap, also a chunked one without a length,
            # is answered 413 by this middleware (raised inside the app, FastAPI would report a parse error).
            buffered: list[Message] = []
            seen = 0
            while True:
                message = await receive()
                buffered.append(message)
                if message["type"] != "http.request":
                    break
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    await self._refuse(send, scope, started, 413, too_large, [(b"connection", b"close")])
                    return
                if not message.get("more_body", False):
                    break
            original = receive

            async def replay() -> Message:
                return buffered.pop(0) if buffered else await original()

            receive = replay

        recorded = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                self._record(scope, status, started)
                recorded = True
                if srv is not None and path not in _UNGATED:
                    await srv.audit.commit()  # group commit: concurrent requests share one transaction
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if not recorded:
                self._record(scope, status, started)

    async def _refuse(self, send: Send, scope: Scope, started: float, status: int, body: dict[str, Any],
                      headers: list[tuple[bytes, bytes]]) -> None:
        """Answer without running the request (it is recorded all the same)."""
        await _send_json(send, status, body, headers)
        self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        app = scope.get("app")
        srv: Server | None = getattr(getattr(app, "state", None), "server", None)
        if srv is None:
            return
        srv.metrics.requests.labels(str(status)).inc()
        principal = (scope.get("state") or {}).get("principal")
        route = getattr(scope.get("route"), "path", None) or "(unmatched)"
        sandbox_id = (scope.get("path_params") or {}).get("sandbox_id")
        kind = "audit.query" if route == "/events" else "api.request"
        srv.audit.record(AuditEvent(kind, {
            "method": scope["method"], "route": route, "status": status,
            "key_id": principal.key_id if principal else None,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3)},
            sandbox_id if isinstance(sandbox_id, str) and len(sandbox_id) <= 64 else None,
            principal.tenant if principal else None))


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": data})


def openapi_json(settings: ServerSettings | None = None) -> str:
    """The API's OpenAPI document, as committed in docs/openapi.json."""
    app = create_app(settings or ServerSettings(), HostConfig.from_env())
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"

