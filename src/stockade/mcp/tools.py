"""The MCP tools' arguments: one pydantic model per tool, from which the JSON schema a client sees is
generated, and against which every call is validated (a bad argument is a tool error naming the field)."""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_CODE = 1 << 20          # characters of code or of a command line
MAX_WRITE = 4 << 20         # characters of file content in one write_file call
SANDBOX_ID = Field(None, description="The id of a sandbox this session created (create_sandbox, list_sandboxes). "
                                     "Omit it to use the session's own sandbox, created on first use.",
                   max_length=128)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def sandbox_path(v: str) -> str:
    if "\0" in v:
        raise ValueError("contains a NUL byte")
    if ".." in v.split("/"):
        raise ValueError("'..' components are not accepted: give the path inside the sandbox directly, "
                         "e.g. /home/user/data.csv or data.csv (relative paths are under /home/user)")
    return v


class _PathArgs(_Args):
    @field_validator("path", check_fields=False)
    @classmethod
    def _path(cls, v: str) -> str:
        return sandbox_path(v)


class RunCode(_Args):
    code: Annotated[str, Field(description="The code to run, as one cell.", min_length=1, max_length=MAX_CODE)]
    language: Literal["python", "javascript", "bash"] = Field(
        "python", description="python (IPython: the last expression is shown, matplotlib figures become images), "
                              "javascript (node) or bash.")
    timeout: float | None = Field(None, gt=0, le=86400, description="Seconds before the cell is interrupted "
                                  "(default: the policy's limits.command_timeout). The interpreter's state is kept.")
    sandbox_id: str | None = SANDBOX_ID


class RunCommand(_Args):
    command: Annotated[str, Field(description="A shell command line (run by sh -c as user 'user').",
                                  min_length=1, max_length=MAX_CODE)]
    cwd: str | None = Field(None, max_length=4096, description="Working directory inside the sandbox "
                            "(default /home/user).")
    timeout: float | None = Field(None, gt=0, le=86400, description="Seconds before the command is killed "
                                  "(default: the policy's limits.command_timeout).")
    background: bool = Field(False, description="Start it and return at once with its pid (e.g. a server); "
                             "its output goes to a log file named in the result.")
    sandbox_id: str | None = SANDBOX_ID

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        return None if v is None else sandbox_path(v)


class ReadFile(_PathArgs):
    path: Annotated[str, Field(description="File path inside the sandbox; relative paths are under /home/user.",
                               min_length=1, max_length=4096)]
    sandbox_id: str | None = SANDBOX_ID


class WriteFile(_PathArgs):
    path: Annotated[str, Field(description="File path inside the sandbox; parent directories are created.",
                               min_length=1, max_length=4096)]
    content: Annotated[str, Field(description="The file's content.", max_length=MAX_WRITE)]
    encoding: Literal["text", "base64"] = Field("text", description="'text' writes content as UTF-8; 'base64' "
                                                "decodes it first (for binary files).")
    sandbox_id: str | None = SANDBOX_ID


class ListFiles(_PathArgs):
    path: str = Field(".", description="Directory inside the sandbox (default /home/user).", max_length=4096)
    depth: int = Field(1, ge=1, le=5, description="How many levels to descend.")
    sandbox_id: str | None = SANDBOX_ID


class ListArtifacts(_Args):
    sandbox_id: str | None = SANDBOX_ID


class DownloadArtifact(_Args):
    name: Annotated[str, Field(description="The artifact's name, as list_artifacts shows it.", min_length=1,
                               max_length=255)]
    sandbox_id: str | None = SANDBOX_ID


class NoArgs(_Args):
    pass


class SandboxRef(_Args):
    sandbox_id: Annotated[str, Field(description="The sandbox's id (from create_sandbox or list_sandboxes).",
                                     min_length=1, max_length=128)]


class SandboxInfoArgs(_Args):
    sandbox_id: str | None = SANDBOX_ID


def schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema without pydantic's generated titles (noise in a model's context)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            # an optional argument is simply not required: {"type": "string"}, not anyOf [string, null]
            # (which some clients' schema handling rejects); null is still accepted as "not given"
            options = node.get("anyOf")
            if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
                node = {**next(o for o in options if o != {"type": "null"}),
                        **{k: v for k, v in node.items() if k != "anyOf" and not (k == "default" and v is None)}}
            return {k: strip(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    out: dict[str, Any] = strip(model.model_json_schema())
    out.setdefault("properties", {})
    out["additionalProperties"] = False
    return out


def error_message(exc: ValidationError) -> str:
    """One line per bad argument: 'field: what is wrong'."""
    lines = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown argument"
        elif err["type"] == "missing":
            msg = "required"
        lines.append(f"{where}: {msg}")
    return "invalid arguments: " + "; ".join(lines)


def normalized(path: str) -> str:
    return posixpath.normpath(path) if path else path
