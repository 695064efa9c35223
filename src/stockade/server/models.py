"""The HTTP API's request and response bodies, and how the core's objects are shaped into them."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.sandboxes import ManagedSandbox
from ..errors import PolicyError
from .service import Server


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
    template: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="the server's template whose layers are the sandbox's root; default: the host root")


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


class TakeSnapshot(_Body):
    name: Annotated[str | None, Field(description="the new template's name (default: <template>-snap-<hex>)")] = None


class PtySizeBody(_Body):
    rows: Annotated[int, Field(ge=1, le=4096)]
    cols: Annotated[int, Field(ge=1, le=4096)]


class RunCommand(_Body):
    cmd: Annotated[str, Field(max_length=1 << 20)] | None = None
    argv: Annotated[list[Annotated[str, Field(max_length=1 << 16)]], Field(max_length=4096)] | None = None
    envs: Envs | None = None
    cwd: Annotated[str, Field(max_length=4096)] | None = None
    stdin: str | None = Field(None, description="base64 of the bytes to feed to stdin")
    timeout: float | None = None
    background: bool = False
    pty: PtySizeBody | None = Field(None, description="run on a pseudo-terminal of this size (output is stdout)")


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



def sandbox_out(srv: Server, sb: ManagedSandbox) -> SandboxOut:
    info = srv.m.info_of(sb)
    return SandboxOut(sandbox_id=sb.id, state=info.state, started_at=sb.started_at, end_at=info.end_at.timestamp(),
                      metadata=info.metadata, user_id=sb.user_id, policy=info.policy, runtime=info.runtime)


def ended_rows(srv: Server, tenant: str) -> list[SandboxOut]:
    return [SandboxOut(sandbox_id=r["id"], state="ended", started_at=r["created"], end_at=r["ended"],
                       metadata=r["metadata"], user_id=r["user_id"], end_reason=r["end_reason"])
            for r in srv.rows.ended_rows(tenant)]


def context_out(ctx: Any) -> ContextOut:
    return ContextOut(id=ctx.id, language=ctx.language, cwd=ctx.cwd, backend=ctx.backend)


def b64_field(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise PolicyError(field, "must be base64") from None
