"""The E2B front end's one door into the server: every call it makes on the server, its registry, auth,
settings and the core (the Manager) is a method here, so a change of either has one module to follow.
The checks are the native routes' own: ``principal`` (API key, rate limit), ``create_sandbox`` (tenant
gate, quotas, one sandbox per user), ``live_sandbox`` (tenant isolation), and the manager records
everything in the audit log under the tenant.

The data plane (envd, code interpreter) is authenticated by per-sandbox tokens handed out at create and
connect. A request bearing one acts as the API key that created or connected the sandbox: the same rate
limit, the same tenant, the same audit records (the key id and the sandbox id are put where the server's
middleware reads them)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.requests import HTTPConnection

from ...core.sandboxes import CodeContext, CommandRecord, ManagedSandbox
from ...errors import PolicyError, QuotaError, SandboxNotFoundError
from ...policy import Policy
from ...runtime.port_stream import PortStream
from ...sdk.models import CommandResult, ProcessInfo
from ..auth import Principal

ENVD_PORT, INTERPRETER_PORT = 49983, 49999
USER_KEY = "user_id"   # the metadata key that names the end user
IDEMPOTENCY_SECONDS = 600.0


class SandboxGone(Exception):
    """The data plane's "no such sandbox": unknown, ended, another tenant's, or a wrong token (all alike)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"The sandbox {sandbox_id[:80]} was not found (or the access token does not match)")


@dataclass
class E2BSandbox:
    id: str
    template: str
    envd_token: str
    traffic_token: str
    who: Principal
    key: str = field(repr=False, default="")   # the API key behind ``who``: checked again (revocation)
    public: bool = False   # created with allowPublicTraffic: its exposed ports need no traffic token


class Core:
    def __init__(self, server: Any) -> None:
        self.srv = server
        self.sandboxes: dict[str, E2BSandbox] = {}
        self.processes: dict[str, dict[int, Any]] = {}   # envd.py's processes per sandbox
        self.watchers: dict[str, dict[str, Any]] = {}    # envd.py's directory watchers per sandbox
        self.idempotent: dict[tuple[str, str], tuple[float, str]] = {}  # (tenant, key) -> (expiry, sandbox)
        self._idem_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # ---- control plane ---------------------------------------------------------------------------
    async def authenticate(self, request: Request) -> Principal:
        from ..deps import principal

        who = await principal(request)
        request.state.e2b_key = _api_key(request)
        return who

    async def create(self, request: Request, who: Principal, template: str, policy: Policy, timeout: float | None,
                     envs: dict[str, str] | None, metadata: dict[str, str] | None,
                     stockade_template: str | None = None) -> E2BSandbox:
        """E2B's create has no user id: the metadata key ``user_id`` is stockade's (audit records, and the
        tenant's one_sandbox_per_user: "reuse" answers with the user's live sandbox)."""
        from ..service import create_sandbox

        key = request.headers.get("idempotency-key")
        if key is None:
            user_id = (metadata or {}).get(USER_KEY) or None
            sb, _ = await create_sandbox(self.srv, who, policy, timeout, envs, metadata, user_id,
                                         template=stockade_template)
            return self.register(request, sb, who, template)
        # E2B's Idempotency-Key: a create retried with the same key (its answer was lost) gets the same
        # sandbox while it runs, for IDEMPOTENCY_SECONDS
        if not 1 <= len(key) <= 255:
            raise PolicyError("Idempotency-Key", "must be 1 to 255 characters")
        now = time.monotonic()
        for k in [k for k, (expiry, _) in self.idempotent.items() if expiry < now]:
            del self.idempotent[k]
            self._idem_locks.pop(k, None)
        slot = (who.tenant, key)
        async with self._idem_locks.setdefault(slot, asyncio.Lock()):
            earlier = self.idempotent.get(slot)
            if earlier is not None and earlier[1] in self.srv.m.sandboxes:
                return self.register(request, self.live(who, earlier[1]), who)
            user_id = (metadata or {}).get(USER_KEY) or None
            sb, _ = await create_sandbox(self.srv, who, policy, timeout, envs, metadata, user_id,
                                         template=stockade_template)
            self.idempotent[slot] = (now + IDEMPOTENCY_SECONDS, sb.id)
            return self.register(request, sb, who, template)

    def register(self, request: Request, sb: ManagedSandbox, who: Principal,
                 template: str | None = None) -> E2BSandbox:
        """The sandbox's E2B tokens (minted on first use: a sandbox created natively gets them at connect)."""
        self._forget_ended()
        known = self.sandboxes.get(sb.id)
        key = str(getattr(request.state, "e2b_key", ""))
        if known is None:
            known = E2BSandbox(sb.id, template or "base", secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                               who, key)
            self.sandboxes[sb.id] = known
        else:  # data-plane calls now count against the key that connected
            known.who, known.key = who, key
        return known

    def domain(self, request: Request) -> str:
        """What the SDKs put after ``{port}-{sandboxID}.`` in get_host(): the server's ``e2b_domain``, else
        the name this request reached the server by (never E2B's own domain, the SDKs' default)."""
        configured: str | None = self.srv.settings.e2b_domain
        return configured or request.headers.get("host", "").strip().lower() or "localhost"

    def port_check(self, sandbox_id: str, port: int) -> None:
        """PolicyError unless the policy's network.expose has ``port``."""
        self.srv.m.check_exposed(sandbox_id, port)

    def open_port(self, sandbox_id: str, port: int) -> AbstractAsyncContextManager[PortStream]:
        """One audited connection to ``port`` inside the sandbox."""
        return self.srv.m.connect_port(sandbox_id, port, via="e2b")  # type: ignore[no-any-return]

    def template_of(self, sandbox_id: str) -> str:
        known = self.sandboxes.get(sandbox_id)
        return known.template if known is not None else "base"

    def live(self, who: Principal, sandbox_id: str) -> ManagedSandbox:
        from ..service import live_sandbox

        return live_sandbox(self.srv, who, sandbox_id)

    def running(self, who: Principal) -> list[ManagedSandbox]:
        """The tenant's running sandboxes, as the native list shows them."""
        return self.srv.m.owned_by(who.tenant)  # type: ignore[no-any-return]

    async def kill(self, who: Principal, sandbox_id: str) -> None:
        self.live(who, sandbox_id)
        await self.srv.m.kill(sandbox_id)
        self.sandboxes.pop(sandbox_id, None)

    def set_timeout(self, who: Principal, sandbox_id: str, seconds: float) -> None:
        self.live(who, sandbox_id)
        self.srv.m.set_timeout(sandbox_id, seconds)

    def update_network(self, who: Principal, sandbox_id: str, changes: dict[str, Any]) -> None:
        """Through the same tenant gate as the native ``PATCH /sandboxes/{id}/network``."""
        sb = self.live(who, sandbox_id)
        self.srv.settings.tenant(who.tenant).check(sb.policy.with_overrides(network=changes))
        self.srv.m.update_network(sandbox_id, changes)

    def ends_in(self, sb: ManagedSandbox) -> float:
        """Wall-clock time at which the sandbox ends (its timeout or its max lifetime)."""
        loop = asyncio.get_running_loop()
        return time.time() + max(0.0, min(sb.deadline, sb.hard_deadline) - loop.time())

    def _forget_ended(self) -> None:
        for sid in [s for s in self.sandboxes if s not in self.srv.m.sandboxes]:
            del self.sandboxes[sid]
            self.processes.pop(sid, None)
            self.watchers.pop(sid, None)

    # ---- data plane ------------------------------------------------------------------------------
    async def data_plane(self, request: HTTPConnection, sandbox_id: str, port: int) -> E2BSandbox:
        """Authenticate a data-plane request by its sandbox's token for ``port``; rate-limit it as the key
        that created or connected the sandbox; mark it for the audit record. Raises ``SandboxGone``."""
        known = self.sandboxes.get(sandbox_id)
        if port == ENVD_PORT:
            given, header = request.headers.get("x-access-token", ""), "envd_token"
        else:
            given, header = request.headers.get("e2b-traffic-access-token", ""), "traffic_token"
        public = known is not None and known.public and port not in (ENVD_PORT, INTERPRETER_PORT)
        if known is None or not (public or hmac.compare_digest(given.encode(), getattr(known, header).encode())):
            raise SandboxGone(sandbox_id)
        return await self._admit(request, known)

    async def signed(self, request: Request, sandbox_id: str, path: str, operation: str) -> E2BSandbox:
        """A ``download_url()``/``upload_url()`` request: E2B's v1 signature, ``v1_`` + unpadded base64 of
        sha256("path:operation:user:envdAccessToken[:expiration]"), made by the SDK with the sandbox's token,
        so it names one path, one operation and, when it has one, a deadline. Without a sandbox id (the
        header form's URL carries none) the signature itself finds its sandbox."""
        query = request.query_params
        signature, expiration = query.get("signature", ""), query.get("signature_expiration")
        user = query.get("username") or ""
        if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
            raise SandboxGone(sandbox_id or "(signed URL)")
        candidates = [self.sandboxes[sandbox_id]] if sandbox_id in self.sandboxes else \
            list(self.sandboxes.values()) if not sandbox_id else []
        for known in candidates:
            raw = f"{path}:{operation}:{user}:{known.envd_token}" + (f":{expiration}" if expiration else "")
            expected = "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
            if hmac.compare_digest(signature.encode(), expected.encode()):
                return await self._admit(request, known)
        raise SandboxGone(sandbox_id or "(signed URL)")

    async def _admit(self, request: HTTPConnection, known: E2BSandbox) -> E2BSandbox:
        sandbox_id = known.id
        keys = self.srv.keys  # a revoked key's sandboxes stop answering too (within the 2 s key cache)
        if keys.cached(known.key) is None and await asyncio.to_thread(keys.authenticate, known.key) is None:
            raise SandboxGone(sandbox_id)
        try:
            self.live(known.who, sandbox_id)
        except SandboxNotFoundError:
            self.sandboxes.pop(sandbox_id, None)
            raise SandboxGone(sandbox_id) from None
        request.scope.setdefault("state", {})["principal"] = known.who
        request.scope.setdefault("path_params", {})["sandbox_id"] = sandbox_id  # the audit record's sandbox
        tenant = self.srv.settings.tenant(known.who.tenant)
        releases = request.url.path.endswith(("/SendSignal", "/CloseStdin"))
        wait = 0.0 if releases else self.srv.limiter.allow(known.who.key_id, tenant.rate_limit, tenant.rate_burst)
        if wait:
            raise QuotaError(f"rate limit: this key may send {tenant.rate_limit:g} requests per second; "
                             f"retry in {wait:.2f}s", retry_after=wait)
        return known

    @property
    def max_upload(self) -> int:
        return int(self.srv.settings.max_upload)

    async def commit(self) -> None:
        """Wait until what was recorded so far is in the audit log (before a stream's last frame)."""
        await self.srv.audit.commit()

    # commands
    async def start_command(self, sandbox_id: str, argv: list[str], *, envs: Mapping[str, str] | None,
                            cwd: str | None, stdin_open: bool, timeout: float | None,
                            on_output: Callable[[str, bytes], None],
                            pty: tuple[int, int] | None = None) -> CommandRecord:
        # With a deadline it is a foreground command (limits.max_command_timeout applies, as to a native one);
        # E2B's "no timeout" (0) is a background command, as natively. A deadline past the sandbox's end is
        # cut to it, as E2B does (its SDK sends 60 s by default, also to a sandbox with less time left).
        if timeout is not None:
            sb = self.srv.m.get(sandbox_id)
            left = min(sb.deadline, sb.hard_deadline) - asyncio.get_running_loop().time()
            timeout = max(min(timeout, left - 0.1), 0.001)  # the margin: the manager looks again later
        return await self.srv.m.start_command(  # type: ignore[no-any-return]
            sandbox_id, argv, envs=envs, cwd=cwd, stdin=None, stdin_open=stdin_open, timeout=timeout,
            background=timeout is None, on_output=on_output, pty=pty)

    async def result_of(self, sandbox_id: str, record: CommandRecord) -> CommandResult:
        return await self.srv.m.result_of(sandbox_id, record)  # type: ignore[no-any-return]

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool = False) -> None:
        await self.srv.m.send_stdin(sandbox_id, pid, data, eof)

    async def resize(self, sandbox_id: str, pid: int, rows: int, cols: int) -> bool:
        return await self.srv.m.resize(sandbox_id, pid, rows, cols)  # type: ignore[no-any-return]

    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool:
        return await self.srv.m.signal(sandbox_id, pid, sig)  # type: ignore[no-any-return]

    async def process_list(self, sandbox_id: str) -> list[ProcessInfo]:
        return await self.srv.m.processes(sandbox_id)  # type: ignore[no-any-return]

    # files
    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        return await self.srv.m.file_op(sandbox_id, op, **args)  # type: ignore[no-any-return]

    async def open_read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        return await self.srv.m.open_read(sandbox_id, path)  # type: ignore[no-any-return]

    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> int:
        return await self.srv.m.write_chunks(sandbox_id, path, chunks)  # type: ignore[no-any-return]

    # code contexts
    async def run_code(self, sandbox_id: str, code: str, *, language: str, context_id: str | None,
                       envs: Mapping[str, str] | None, on_output: Callable[[str, bytes], None],
                       on_event: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], Any]:
        return await self.srv.m.run_code(  # type: ignore[no-any-return]
            sandbox_id, code, language=language, context_id=context_id, envs=envs, on_output=on_output,
            on_event=on_event)

    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> CodeContext:
        return await self.srv.m.create_context(sandbox_id, language, cwd)  # type: ignore[no-any-return]

    def list_contexts(self, sandbox_id: str) -> list[CodeContext]:
        return self.srv.m.list_contexts(sandbox_id)  # type: ignore[no-any-return]

    async def restart_context(self, sandbox_id: str, context_id: str) -> CodeContext:
        return await self.srv.m.restart_context(sandbox_id, context_id)  # type: ignore[no-any-return]

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        await self.srv.m.remove_context(sandbox_id, context_id)


def _api_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")


def core_of(request: HTTPConnection) -> Core:
    state = request.app.state
    core: Core | None = getattr(state, "e2b_core", None)
    if core is None or core.srv is not state.server:
        core = Core(state.server)
        state.e2b_core = core
    return core
