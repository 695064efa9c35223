"""The remote transport: the same Sandbox API against a `stockade serve` server, over HTTP (httpx).

Commands and code cells stream as server-sent events; output bytes arrive base64-encoded, so what the
caller gets is byte-for-byte what the process wrote. Server errors are raised as the same exception
classes local mode raises (see ``errors.WIRE_ERRORS``). Transport failures are stockade errors too, naming
the URL and the request: ServerConnectionError (refused, reset, DNS, TLS), errors.TimeoutError (no answer in
time), ServerResponseError (what answered is not the stockade API, e.g. a proxy's HTML page).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from ...artifacts import ArtifactInfo
from ...core.sandboxes import Argv
from ...errors import (
    QuotaError,
    SandboxNotFoundError,
    SandboxUnavailableError,
    ServerConnectionError,
    ServerResponseError,
    StockadeError,
    from_wire,
)
from ...errors import TimeoutError as StockadeTimeoutError
from ...policy import Policy
from ..code import Context
from ..models import CommandResult, ProcessInfo, SandboxInfo, SandboxMetrics
from .base import EventSink, OutputSink, Transport

MAX_EVENT_LINE = 64 << 20   # one SSE data line (a cell's figure can be large)
KILL_RETRY_FOR = 30.0       # seconds a kill retries a rate-limit answer, after the server's Retry-After


@dataclass
class RemoteCommand:
    pid: int
    cmd: str
    task: asyncio.Task[CommandResult]


class RemoteTransport(Transport):
    def __init__(self, api_url: str, api_key: str, timeout: float = 300.0) -> None:
        if not api_key:
            raise StockadeError("an API key is needed for a stockade server: pass api_key= or set STOCKADE_API_KEY")
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:  # made on first use, on the portal loop that will use it
            self._http = httpx.AsyncClient(
                base_url=self.api_url, headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=httpx.Timeout(self._timeout, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        return self._http

    @contextlib.contextmanager
    def _transport_errors(self, method: str, path: str) -> Iterator[None]:
        """httpx's failures as stockade errors that say what was tried."""
        what = f"{method} {self.api_url}{path}"
        try:
            yield
        except httpx.TimeoutException as exc:
            raise StockadeTimeoutError(f"{what}: no answer from the stockade server in time "
                                       f"({type(exc).__name__}); is it overloaded or unreachable?") from exc
        except httpx.ConnectError as exc:
            raise ServerConnectionError(f"{what}: could not connect to the stockade server: {exc or 'refused'}",
                                        "check that `stockade serve` runs there and the URL (api_url) is right") \
                from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise ServerConnectionError(f"{what}: the connection to the stockade server failed mid-request "
                                        f"({type(exc).__name__}: {exc or 'closed'})") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._transport_errors(method, path):
            r = await self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise _error(r.status_code, r.content, r.headers, f"{method} {self.api_url}{path}")
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise _not_the_api(f"{method} {self.api_url}{path}", r.status_code, r.headers, r.content) from None

    @staticmethod
    def _info(d: dict[str, Any]) -> SandboxInfo:
        return SandboxInfo(d["sandbox_id"], datetime.fromtimestamp(d["started_at"]),
                           datetime.fromtimestamp(d["end_at"] or d["started_at"]), dict(d.get("metadata") or {}),
                           d.get("policy") or {}, d.get("runtime") or {}, d.get("state", "running"), d.get("user_id"))

    # ---- sandboxes ------------------------------------------------------------------------------
    async def create(self, policy: Policy, timeout: float | None, envs: Mapping[str, str] | None,
                     metadata: Mapping[str, str] | None, *, user_id: str | None = None,
                     runtime: str | None = None, template: str | None = None) -> SandboxInfo:
        body = {"policy": policy.model_dump(mode="json"), "timeout": timeout, "envs": dict(envs or {}),
                "metadata": dict(metadata or {}), "user_id": user_id, "runtime": runtime}
        if template is not None:  # only when asked: a server without templates refuses the field
            body["template"] = template
        return self._info(await self._call("POST", "/sandboxes", json=body))

    async def info(self, sandbox_id: str) -> SandboxInfo:
        return self._info(await self._call("GET", f"/sandboxes/{_id(sandbox_id)}"))

    async def list(self) -> builtins.list[SandboxInfo]:
        return [self._info(d) for d in await self._call("GET", "/sandboxes")]

    async def kill(self, sandbox_id: str) -> bool:
        """A rate-limit answer is retried after the server's Retry-After (the server exempts kills from its
        limiter; an older one or a proxy may not), so leaving ``with Sandbox.create(...)`` ends the sandbox."""
        deadline = asyncio.get_running_loop().time() + KILL_RETRY_FOR
        while True:
            try:
                await self._call("DELETE", f"/sandboxes/{_id(sandbox_id)}")
                return True
            except SandboxNotFoundError:
                return False
            except QuotaError as exc:
                wait = min(max(exc.retry_after or 1.0, 0.05), 5.0)
                if asyncio.get_running_loop().time() + wait > deadline:
                    raise
                await asyncio.sleep(wait)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/timeout", json={"timeout": seconds})

    async def snapshot(self, sandbox_id: str, name: str | None) -> str:
        out = await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/snapshot", json={"name": name})
        return str(out["template"])

    # ---- commands -------------------------------------------------------------------------------
    async def run(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                  cwd: str | None, stdin: bytes | None, timeout: float | None,
                  on_output: OutputSink | None) -> CommandResult:
        token = await self.start(sandbox_id, cmd, envs=envs, cwd=cwd, stdin=stdin, timeout=timeout,
                                 on_output=on_output, background=False)
        return await self.wait(sandbox_id, token)

    async def start(self, sandbox_id: str, cmd: str | Argv, *, envs: Mapping[str, str] | None,
                    cwd: str | None, stdin: bytes | None, timeout: float | None,
                    on_output: OutputSink | None, background: bool = True,
                    pty: tuple[int, int] | None = None) -> RemoteCommand:
        body: dict[str, Any] = {("cmd" if isinstance(cmd, str) else "argv"): cmd, "envs": dict(envs or {}),
                                "cwd": cwd, "timeout": timeout, "background": background}
        if pty is not None:
            body["pty"] = {"rows": int(pty[0]), "cols": int(pty[1])}
        if stdin is not None:
            body["stdin"] = base64.b64encode(stdin).decode()
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def pump() -> CommandResult:
            out = {"stdout": bytearray(), "stderr": bytearray()}
            async for event, data in self._events("POST", f"/sandboxes/{_id(sandbox_id)}/commands", json=body):
                if event == "start" and not started.done():
                    started.set_result(int(data["pid"]))
                elif event in out:
                    chunk = base64.b64decode(data["b64"])
                    out[event] += chunk
                    if on_output is not None:
                        on_output(event, chunk)
                elif event == "exit":
                    return CommandResult(out["stdout"].decode("utf-8", "replace"),
                                         out["stderr"].decode("utf-8", "replace"), int(data["exit_code"]),
                                         bool(data.get("truncated")), bool(data.get("timed_out")),
                                         bytes(out["stdout"]), bytes(out["stderr"]),
                                         data.get("limit") if isinstance(data.get("limit"), str) else None,
                                         data.get("error") if isinstance(data.get("error"), str) else None)
            raise SandboxUnavailableError("the server ended the command's stream before the command ended")

        task = asyncio.get_running_loop().create_task(pump())
        waiting: builtins.list[asyncio.Future[Any]] = [started, task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await task  # raises the server's error
            raise SandboxUnavailableError("the server did not report the command's start")
        return RemoteCommand(started.result(), cmd if isinstance(cmd, str) else " ".join(cmd), task)

    async def wait(self, sandbox_id: str, token: Any) -> CommandResult:
        command: RemoteCommand = token
        return await asyncio.shield(command.task)

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None:
        await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/commands/{int(pid)}/stdin",
                         params={"eof": "true" if eof else "false"}, content=data,
                         headers={"content-type": "application/octet-stream"})

    async def resize(self, sandbox_id: str, pid: int, rows: int, cols: int) -> bool:
        answer = await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/commands/{int(pid)}/resize",
                                  json={"rows": int(rows), "cols": int(cols)})
        return bool(answer["resized"])

    async def signal(self, sandbox_id: str, pid: int, sig: int) -> bool:
        answer = await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/commands/{int(pid)}/signal",
                                  json={"signal": int(sig)})
        return bool(answer["delivered"])

    async def kill_all(self, sandbox_id: str) -> int:
        answer = await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/commands/kill")
        return int(answer["killed"])

    async def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        return [ProcessInfo(p["pid"], p["cmd"], p.get("tag"))
                for p in await self._call("GET", f"/sandboxes/{_id(sandbox_id)}/commands")]

    async def metrics(self, sandbox_id: str, start: float | None,
                      end: float | None) -> builtins.list[SandboxMetrics]:
        params = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        rows = await self._call("GET", f"/sandboxes/{_id(sandbox_id)}/metrics", params=params)
        return [SandboxMetrics.from_dict(m) for m in rows if isinstance(m, dict)]

    async def forward_port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        # A TCP forward needs a raw stream through the server, which it does not offer; HTTP does go through
        raise StockadeError(f"get_host() needs the local transport; through a server, port {int(port)} answers "
                            f"HTTP at {self.api_url}/sandboxes/{_id(sandbox_id)}/ports/{int(port)}/ (with the API key)")

    # ---- files ----------------------------------------------------------------------------------
    def read(self, sandbox_id: str, path: str) -> AsyncGenerator[bytes, None]:
        # a file can take as long as the sandbox needs to produce it: no read timeout
        return self._download(f"/sandboxes/{_id(sandbox_id)}/files", {"path": path},
                              httpx.Timeout(None, connect=10.0))

    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> int:
        answer = await self._call("PUT", f"/sandboxes/{_id(sandbox_id)}/files", params={"path": path},
                                  content=chunks, headers={"content-type": "application/octet-stream"})
        return int(answer["size"])

    async def file_op(self, sandbox_id: str, op: str, **args: Any) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/files/{op}", json=args)
        return answer

    # ---- code -----------------------------------------------------------------------------------
    @staticmethod
    def _context(d: dict[str, Any]) -> Context:
        return Context(d["id"], d["language"], d["cwd"], d.get("backend", ""))

    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context:
        return self._context(await self._call("POST", f"/sandboxes/{_id(sandbox_id)}/contexts",
                                              json={"language": language, "cwd": cwd}))

    async def list_contexts(self, sandbox_id: str) -> builtins.list[Context]:
        return [self._context(d) for d in await self._call("GET", f"/sandboxes/{_id(sandbox_id)}/contexts")]

    async def restart_context(self, sandbox_id: str, context_id: str) -> Context:
        return self._context(await self._call(
            "POST", f"/sandboxes/{_id(sandbox_id)}/contexts/{_id(context_id)}/restart"))

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        await self._call("DELETE", f"/sandboxes/{_id(sandbox_id)}/contexts/{_id(context_id)}")

    async def run_code(self, sandbox_id: str, code: str, *, language: str, context_id: str | None,
                       envs: Mapping[str, str] | None, timeout: float | None, on_output: OutputSink,
                       on_event: EventSink) -> dict[str, Any]:
        body = {"code": code, "language": language, "context_id": context_id, "envs": dict(envs or {}),
                "timeout": timeout}
        async for event, data in self._events("POST", f"/sandboxes/{_id(sandbox_id)}/code", json=body):
            if event in ("stdout", "stderr"):
                on_output(event, base64.b64decode(data["b64"]))
            elif event == "event":
                on_event(data)
            elif event == "done":
                done: dict[str, Any] = data
                return done
        raise SandboxUnavailableError("the server ended the cell's stream before the cell ended")

    # ---- artifacts, network, audit --------------------------------------------------------------
    async def list_artifacts(self, sandbox_id: str) -> builtins.list[ArtifactInfo]:
        return [ArtifactInfo(a["name"], a["size"], a["sha256"], a["media_type"],
                             datetime.fromtimestamp(a["created_at"]), a["command"])
                for a in await self._call("GET", f"/sandboxes/{_id(sandbox_id)}/artifacts")]

    def read_artifact(self, sandbox_id: str, name: str) -> AsyncGenerator[bytes, None]:
        return self._download(f"/sandboxes/{_id(sandbox_id)}/artifacts/{_id(name)}", {}, self.http.timeout)

    async def _download(self, path: str, params: dict[str, str],
                        timeout: httpx.Timeout) -> AsyncGenerator[bytes, None]:
        with self._transport_errors("GET", path):
            async with self.http.stream("GET", path, params=params, timeout=timeout) as r:
                if r.status_code >= 400:
                    raise _error(r.status_code, await r.aread(), r.headers, f"GET {self.api_url}{path}")
                async for chunk in r.aiter_bytes():
                    yield chunk

    async def update_network(self, sandbox_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("PATCH", f"/sandboxes/{_id(sandbox_id)}/network", json=changes)
        return answer

    async def network_events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        answer: builtins.list[dict[str, Any]] = await self._call("GET", f"/sandboxes/{_id(sandbox_id)}/network/events")
        return answer

    async def audit_events(self, sandbox_id: str, type: str | None, after_id: int | None,
                           limit: int) -> builtins.list[dict[str, Any]]:
        params: dict[str, Any] = {"sandbox_id": sandbox_id, "limit": limit}
        if type is not None:
            params["type"] = type
        if after_id is not None:
            params["after_id"] = after_id
        answer: builtins.list[dict[str, Any]] = await self._call("GET", "/events", params=params)
        return answer

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- server-sent events ---------------------------------------------------------------------
    async def _events(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs of an SSE response; an ``error`` event is raised as the error it names."""
        headers = {"accept": "text/event-stream"}
        what = f"{method} {self.api_url}{path}"
        with self._transport_errors(method, path):
            async with self.http.stream(method, path, headers=headers, timeout=httpx.Timeout(None, connect=10.0),
                                        **kwargs) as r:
                if r.status_code >= 400:
                    raise _error(r.status_code, await r.aread(), r.headers, what)
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    raise _not_the_api(what, r.status_code, r.headers, await r.aread())
                event, data = "message", ""
                async for line in r.aiter_lines():
                    if len(line) > MAX_EVENT_LINE:
                        raise SandboxUnavailableError("the server sent an oversized event")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        try:
                            payload = json.loads(data)
                        except ValueError:
                            raise _not_the_api(what, r.status_code, r.headers, data.encode()) from None
                        if event == "error":
                            raise from_wire(0, payload)
                        yield event, payload
                        event, data = "message", ""


def _id(value: str) -> str:
    """A path segment: ids never contain '/', and one that does is refused here rather than re-routed."""
    if not value or "/" in value or value in (".", ".."):
        raise SandboxNotFoundError(f"{value!r} is not a valid id")
    return quote(value, safe="")


def _error(status: int, content: bytes, headers: httpx.Headers, what: str) -> StockadeError:
    try:
        body = json.loads(content)
    except ValueError:
        return _not_the_api(what, status, headers, content)
    if not isinstance(body, dict) or "code" not in body:
        return _not_the_api(what, status, headers, content)
    if body.get("code") == "quota_exceeded" and "retry_after" not in body:
        with contextlib.suppress(ValueError):
            body["retry_after"] = float(headers.get("retry-after", ""))
    return from_wire(status, body)


def _not_the_api(what: str, status: int, headers: httpx.Headers, content: bytes) -> ServerResponseError:
    kind = headers.get("content-type", "no content type")
    start = content[:200].decode("utf-8", "replace")
    return ServerResponseError(f"{what}: the answer is not the stockade API's (HTTP {status}, {kind}: {start!r})",
                               "a proxy in between may have answered, or api_url points at something else")
