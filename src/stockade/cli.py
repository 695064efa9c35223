"""The `stockade` command line: run, repl, doctor, policy, env, template, mcp, serve, keys, logs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .errors import StockadeError

if TYPE_CHECKING:  # pydantic's models cost ~70 ms: imported by the commands that take a policy
    from .policy import Policy

app = typer.Typer(help="Run untrusted, AI-written code in a throw-away sandbox on this machine.",
                  no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None)  # typer's rich help shows every flag as `--help <bool>`
policy_app = typer.Typer(help="Inspect policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
env_app = typer.Typer(help="The Python environment every sandbox gets (for the code interpreter).",
                      no_args_is_help=True)
app.add_typer(env_app, name="env")
keys_app = typer.Typer(help="API keys of a stockade server (stored as hashes in its database).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")
from .templates.cli import template_app  # noqa: E402 - the template commands live beside the store

app.add_typer(template_app, name="template")

DATA_DIR = typer.Option(None, "--data-dir", help="The server's data directory (state and audit log).")
CONFIG = typer.Option(None, "--config", help="Server config file (TOML); also STOCKADE_CONFIG.")

EXIT_TIMEOUT = 124


def _load_policy(path: Path | None, timeout: float | None = None, memory: str | None = None,
                 margin: float = 10) -> Policy:
    """The file's policy (or the defaults) with --memory, and --timeout as each command's time and, plus
    ``margin`` seconds, the sandbox's life at least."""
    from .policy import Policy

    policy = Policy.from_file(path) if path else Policy()
    if memory is not None:
        policy = policy.with_overrides(limits={"memory": memory})
    if timeout is not None:
        life = policy.lifetime
        ttl = max(life.timeout, timeout + margin)
        policy = policy.with_overrides(limits={"command_timeout": timeout},
                                       lifetime={"timeout": ttl, "max_lifetime": max(life.max_lifetime, ttl)})
    return policy


def _fail(exc: StockadeError, code: int = 2) -> typer.Exit:
    typer.echo(f"stockade: {exc}", err=True)
    return typer.Exit(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    args: list[str] = typer.Argument(None, help="FILE.py to run with python3, or -- CMD ARG... to run as is."),
    code: str | None = typer.Option(None, "-c", help="Python code to run."),
    policy: Path | None = typer.Option(None, "--policy", "-p", help="Policy file (TOML or JSON)."),
    timeout: float | None = typer.Option(None, "--timeout", "-t", help="Wall time for the command, seconds."),
    memory: str | None = typer.Option(None, "--memory", "-m", help="Memory limit, e.g. 256MiB."),
    runtime: str | None = typer.Option(None, "--runtime", help="Runtime to run on (default: STOCKADE_RUNTIME, "
                                       "else jail)."),
    template: str | None = typer.Option(None, "--template", help="Template whose layers are the sandbox's root "
                                        "(see `stockade template list`; default: the host root)."),
) -> None:
    """Run code once in a fresh sandbox, stream its output, exit with its status (124 on timeout).
    Nothing is left behind."""
    from .sdk import Sandbox

    global _exit_fast
    _exit_fast = True

    args = args or []
    if (code is None) == (not args):
        raise _fail(StockadeError("give exactly one of: FILE.py, -c CODE, or -- CMD ARG..."))
    try:
        pol = _load_policy(policy, timeout, memory)
        with Sandbox.create(policy=pol, runtime=runtime, template=template) as sb:
            if code is not None:
                argv = ["python3", "-c", code]
            elif len(args) == 1 and args[0].endswith(".py") and Path(args[0]).is_file():
                name = Path(args[0]).name
                with open(args[0], "rb") as f:
                    sb.files.write(name, f)
                argv = ["python3", name]
            else:
                argv = list(args)
            result = sb.commands.run(argv, on_stdout=_writer(sys.stdout), on_stderr=_writer(sys.stderr))
    except StockadeError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if result.truncated and result.limit != "limits.output":
        typer.echo(f"stockade: output was truncated at limits.output ({pol.to_display()['limits']['output']})",
                   err=True)
    if result.error:  # which limit was hit, and the policy field that raises it
        typer.echo(f"stockade: {result.error}", err=True)
    if result.timed_out:  # result.error said so, with the timeout and its field
        raise typer.Exit(EXIT_TIMEOUT)
    raise typer.Exit(result.exit_code if result.exit_code >= 0 else 128 - result.exit_code)


def _writer(stream: Any) -> Any:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


@app.command()
def repl(
    language: str = typer.Option("python", "--language", "-l", help="python, bash or javascript."),
    policy: Path | None = typer.Option(None, "--policy", "-p", help="Policy file (TOML or JSON)."),
    images: Path = typer.Option(Path("."), "--images", help="Directory where image results are saved."),
) -> None:
    """An interactive session on one fresh sandbox: each line (or block) is a run_code call. Results are
    printed; images are saved to files named in the output. Ends at EOF (Ctrl-D); the sandbox goes with it."""
    import base64
    import codeop

    from .sdk import Sandbox

    interactive = sys.stdin.isatty()
    try:
        pol = _load_policy(policy)
        with Sandbox.create(policy=pol) as sb:
            context = sb.create_code_context(language)
            if interactive:
                typer.echo(f"stockade repl: {language} ({context.backend}) in sandbox {sb.id}; Ctrl-D ends it")
            saved = 0
            while (cell := _read_cell(language, interactive, codeop)) is not None:
                if not cell.strip():
                    continue
                execution = sb.run_code(cell, context=context, on_stdout=_writer(sys.stdout),
                                        on_stderr=_writer(sys.stderr))
                for result in execution.results:
                    for fmt in ("png", "jpeg", "svg"):
                        data = getattr(result, fmt)
                        if data:
                            saved += 1
                            path = images / f"stockade-repl-{saved}.{fmt}"
                            path.write_bytes(data.encode() if fmt == "svg" else base64.b64decode(data))
                            typer.echo(f"[image saved to {path}]")
                            break
                    else:
                        if result.text is not None:
                            typer.echo(result.text)
                if execution.error:
                    typer.echo(execution.error.traceback or f"{execution.error.name}: {execution.error.value}",
                               err=True)
    except StockadeError as exc:
        raise _fail(exc) from None


def _read_cell(language: str, interactive: bool, codeop: Any) -> str | None:
    """One cell from stdin: a line, or for python a block completed the way the python REPL does."""
    lines: list[str] = []
    while True:
        if interactive:
            sys.stdout.write("... " if lines else ">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        lines.append(line.rstrip("\n"))
        if language != "python":
            return lines[0]
        source = "\n".join(lines)
        try:
            complete = codeop.compile_command(source, "<repl>", "exec") is not None
        except (SyntaxError, ValueError, OverflowError):
            complete = True  # let the interpreter report it
        if complete and (len(lines) == 1 or not line.strip()):
            return source


@app.command()
def doctor() -> None:
    """Check what the sandbox needs from this host and say how to fix what is missing."""
    from .doctor import run_checks, verdict

    checks = run_checks()
    for c in checks:
        tag = "OK  " if c.ok else ("FAIL" if c.required else "WEAK")
        typer.echo(f"[{tag}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            typer.echo(f"       fix: {c.fix}")
    typer.echo(verdict(checks))
    if any(not c.ok and c.required for c in checks):
        raise typer.Exit(1)


@env_app.command("build")
def env_build(packages: list[str] = typer.Argument(None, help="Extra packages to install.")) -> None:
    """Build (or update) the sandbox environment: IPython, matplotlib, numpy, pandas, plus PACKAGES."""
    from .environment import DEFAULT_PACKAGES, build

    try:
        path = build(packages=DEFAULT_PACKAGES + tuple(packages or ()))
    except StockadeError as exc:
        raise _fail(exc) from None
    typer.echo(f"sandbox environment ready: {path} (mounted read-only at /opt/stockade/env)")


@env_app.command("show")
def env_show() -> None:
    """Where the sandbox environment is, its interpreter and the packages in it, with versions."""
    from .config import HostConfig
    from .environment import MOUNT, VENV, describe, is_built

    path = HostConfig.from_env().sandbox_env
    if not is_built(path):
        typer.echo(f"{path}: not built (run `stockade env build`)")
        return
    info = describe(path)
    typer.echo(f"{path}: built (mounted read-only at {MOUNT} in every sandbox; `pip install` inside a sandbox "
               f"writes to its own venv at {VENV})")
    typer.echo(f"python {info['version']} ({info['python']})")
    for name, version in info["packages"].items():  # type: ignore[attr-defined]
        typer.echo(f"{name} {version}")


@policy_app.command("show")
def policy_show(policy: Path | None = typer.Option(None, "--policy", "-p", help="Policy file (TOML or JSON).")) -> None:
    """Print the effective policy (defaults filled in) as TOML."""
    try:
        typer.echo(to_toml(_load_policy(policy).to_display()), nl=False)
    except StockadeError as exc:
        raise _fail(exc) from None


def to_toml(d: dict[str, Any]) -> str:
    """TOML for the policy's shape: top-level scalars and lists, then one table per section."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(name: str, fields: dict[str, Any], header: str) -> list[str]:
        out = [header] if header else []
        nested: list[str] = []
        for k, v in fields.items():
            if v is None:  # TOML has no null: an absent key means the default
                continue
            if isinstance(v, dict):
                nested += table(f"{name}.{k}", v, f"\n[{name}.{k}]")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    nested += table(f"{name}.{k}", item, f"\n[[{name}.{k}]]")
            else:
                out.append(f"{k} = {value(v)}")
        return out + nested

    lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for section, fields in d.items():
        if isinstance(fields, dict):
            lines += table(section, fields, f"\n[{section}]")
    return "\n".join(lines).lstrip("\n") + "\n"



@app.command()
def mcp(
    http: bool = typer.Option(False, "--http", help="Serve the MCP streamable HTTP transport instead of stdio."),
    host: str = typer.Option("127.0.0.1", "--host", help="With --http: address to listen on."),
    port: int = typer.Option(8422, "--port", help="With --http: port."),
    policy: Path | None = typer.Option(None, "--policy", "-p", help="Policy file for every sandbox (TOML or JSON)."),
    template: str | None = typer.Option(None, "--template", help="Template the sandboxes start from."),
    api_url: str | None = typer.Option(None, "--api-url", envvar="STOCKADE_API_URL",
                                       help="Run the sandboxes on this `stockade serve` (key: STOCKADE_API_KEY)."),
    token: str | None = typer.Option(None, "--token", envvar="STOCKADE_MCP_TOKEN",
                                     help="With --http: the bearer token clients must send. With --api-url and "
                                          "neither a token nor STOCKADE_API_KEY, each client sends its own "
                                          "stockade API key instead."),
) -> None:
    """Serve sandboxes to MCP clients (Claude Desktop, Cursor, agent frameworks): one sandbox per MCP
    session, killed when the session ends. stdio by default; --http for remote clients (bearer token, or
    each client's own stockade API key when it fronts a `stockade serve`)."""
    import asyncio
    import os
    import secrets

    try:
        from .mcp import Options, serve_http, serve_stdio, supports_template
        from .mcp.app import is_loopback
    except ImportError as exc:  # the SDK is a dependency; a broken install says so instead of a traceback
        raise _fail(StockadeError(f"the MCP server needs the `mcp` package: {exc}")) from None
    if template is not None and not supports_template():
        raise _fail(StockadeError("--template: templates are not available yet in this version of stockade; "
                                  "run without --template (sandboxes use the default image)"))
    try:
        options = Options(policy=_load_policy(policy), api_url=api_url or None,
                          api_key=os.environ.get("STOCKADE_API_KEY") or None, template=template)
    except StockadeError as exc:
        raise _fail(exc) from None
    if not http:
        asyncio.run(serve_stdio(options))
        return
    if not token and options.api_url and not options.api_key:  # the server checks each client's own key
        typer.echo(f"stockade mcp: clients authenticate with their own stockade API key (Authorization: Bearer "
                   f"sk_...), checked by {options.api_url}", err=True)
    elif not token:
        if not is_loopback(host):
            raise _fail(StockadeError(f"--host {host} is not a loopback address: give clients a bearer token with "
                                      "--token or STOCKADE_MCP_TOKEN (anyone who can reach the port could run "
                                      "code otherwise)"))
        token = secrets.token_urlsafe(24)
        typer.echo(f"stockade mcp: no --token given; clients must send Authorization: Bearer {token}", err=True)
    try:
        asyncio.run(serve_http(options, token, host, port))
    except KeyboardInterrupt:
        pass


# ---- server -----------------------------------------------------------------------------------------
def _settings(config: Path | None, **overrides: Any) -> Any:
    from .server.settings import ServerSettings

    try:
        return ServerSettings.load(config, **overrides)
    except StockadeError as exc:
        raise _fail(exc) from None


def _engine(config: Path | None, data_dir: Path | None) -> Any:
    from .config import HostConfig
    from .db import engine_for

    settings = _settings(config, data_dir=data_dir)
    return engine_for(settings.database_url, settings.data_dir or HostConfig.from_env().data_dir)


@app.command()
def serve(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default 8421)."),
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Serve the HTTP API: sandboxes for many tenants, authenticated by API keys (`stockade keys create`)."""
    import uvicorn

    from .server.app import create_app
    from .server.protocol import uvicorn_options

    settings = _settings(config, host=host, port=port, data_dir=data_dir)
    try:
        application = create_app(settings)
    except StockadeError as exc:
        raise _fail(exc) from None
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10, **uvicorn_options(settings))


@app.command()
def openapi() -> None:
    """Print the server's OpenAPI document (docs/openapi.json is this output)."""
    from .server.app import openapi_json

    typer.echo(openapi_json(), nl=False)


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts for."),
                name: str = typer.Option("", "--name", help="A note to recognise the key by."),
                data_dir: Path | None = DATA_DIR, config: Path | None = CONFIG) -> None:
    """Create an API key. It is printed once: only its hash is kept."""
    from .server.auth import KeyStore

    try:
        key_id, key = KeyStore(_engine(config, data_dir)).create(tenant, name)
    except ValueError as exc:
        typer.echo(f"stockade: --tenant: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(key)
    typer.echo(f"key id {key_id} for tenant {tenant}; this is the only time the key is shown", err=True)


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, "--tenant", help="Only the keys of this tenant."),
              data_dir: Path | None = DATA_DIR,
              config: Path | None = CONFIG) -> None:
    """List keys (ids, tenants, state); never the keys themselves."""
    import datetime

    from .server.auth import KeyStore

    for k in KeyStore(_engine(config, data_dir)).list(tenant):
        when = datetime.datetime.fromtimestamp(k["created"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        state = "revoked" if k["revoked"] else "active"
        typer.echo(f"{k['id']}  {k['tenant']}  {state}  {when}  {k['name']}")


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: Path | None = DATA_DIR, config: Path | None = CONFIG) -> None:
    """Revoke a key by its id; a running server refuses it within seconds."""
    from .server.auth import KeyStore

    if not KeyStore(_engine(config, data_dir)).revoke(key_id.removeprefix("sk_")[:16]):
        typer.echo(f"stockade: no active key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def logs(
    sandbox_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    since: str | None = typer.Option(None, "--since", help="Only events newer than this: 10m, 2h, or a Unix time."),
    type: str | None = typer.Option(None, "--type", help="Only this event type (or family: command, file...)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Print a sandbox's audit log: lifecycle, commands and their output, files, network."""
    import json
    import time

    from .audit.events import EventFilter
    from .audit.store import SQLAudit
    from .policy import parse_duration

    start: float | None = None
    if since:
        try:
            start = float(since) if since.replace(".", "", 1).isdigit() and float(since) > 1e9 else \
                time.time() - parse_duration(since)
        except ValueError as exc:
            typer.echo(f"stockade: --since: {exc}", err=True)
            raise typer.Exit(2) from None
    audit = SQLAudit(_engine(config, data_dir))
    last: int | None = None
    try:
        while True:
            batch = audit.query(EventFilter(sandbox_id=sandbox_id, type=type, since=start, after_id=last))
            for e in batch:
                typer.echo(json.dumps(e.to_dict()) if as_json else _event_line(e.to_dict()))
                last = e.id
            if not follow:
                if last is None:
                    typer.echo(f"stockade: no events for {sandbox_id}", err=True)
                    raise typer.Exit(1)
                return
            if not batch:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        audit.close()


def _event_line(e: dict[str, Any]) -> str:
    import datetime
    import json

    when = datetime.datetime.fromtimestamp(e["time"], datetime.UTC).strftime("%H:%M:%S.%f")[:-3]
    d = e["data"]
    if e["type"] == "command.start":
        text = "$ " + (d.get("cmd") or " ".join(d.get("argv") or []))
    elif e["type"] in ("command.end", "code.end"):
        code = d.get("exit_code", d.get("execution_count"))
        text = f"exit {code} after {d.get('duration', 0):.3f}s" + "".join(
            f"\n  {stream}: " + d[stream].rstrip("\n").replace("\n", "\n  " + " " * len(stream) + "  ")
            for stream in ("stdout", "stderr") if d.get(stream))
    elif e["type"] == "code.run":
        text = d.get("code", "")
    else:
        text = json.dumps(d, separators=(",", ":"))
    return f"{when} {e['type']:<18} {text}"


# `stockade run` skips the interpreter's teardown (~35 ms of module and object finalization) once it is
# done: the sandbox is gone, and the atexit handlers, run here first, shut the manager down and close the
# audit store (every event committed). Only `main()` (the `stockade` script) does this, never an
# in-process caller of `app` (tests' CliRunner), and only after `run`.
_exit_fast = False


def main() -> None:
    import atexit
    import os

    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if not _exit_fast:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message") prints it and exits 1, as the interpreter does
        sys.stderr.write(f"{code}\n")
        sys.stderr.flush()
        code = 1
    os._exit(code)


if __name__ == "__main__":
    main()
