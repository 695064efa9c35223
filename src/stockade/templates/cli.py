"""`stockade template import|list|show|rm|gc` (mounted by stockade/cli.py as one sub-app)."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import typer

from .errors import TemplateError

template_app = typer.Typer(help="Templates: root filesystems sandboxes start from (imported images, builds, "
                                "snapshots).",
                           no_args_is_help=True)
STORE = typer.Option(None, "--store", help="Template store directory (default: <data dir>/templates).")


def _store(path: Path | None):  # type: ignore[no-untyped-def]
    from .store import TemplateStore

    return TemplateStore(path)


def _fail(exc: TemplateError) -> typer.Exit:
    typer.echo(f"stockade: {exc}", err=True)
    return typer.Exit(2)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@template_app.command("import")
def template_import(
    name: str = typer.Argument(..., help="Name of the new template."),
    source: str = typer.Argument(..., help="oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF] "
                                           "or docker://REGISTRY/REPO[:TAG|@DIGEST]."),
    creds: str | None = typer.Option(None, "--creds", help="USER[:PASSWORD] for the registry (or "
                                                           "STOCKADE_REGISTRY_PASSWORD)."),
    authfile: Path | None = typer.Option(None, "--authfile", help="A containers auth.json (podman/skopeo)."),
    tls_verify: bool = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify the registry's TLS."),
    start_cmd: str | None = typer.Option(None, "--start-cmd", help="Command started in the background in each "
                                                                   "sandbox before it is handed out."),
    ready_cmd: str | None = typer.Option(None, "--ready-cmd", help="Command that succeeds once it is ready."),
    store: Path | None = STORE,
) -> None:
    """Import an OCI or Docker image as a template."""
    from .oci import Credentials, Progress, import_image

    user, _, password = (creds or "").partition(":")
    if user and not password:
        password = os.environ.get("STOCKADE_REGISTRY_PASSWORD") or typer.prompt("registry password", hide_input=True)
    credentials = Credentials(username=user, password=password, authfile=str(authfile or ""), tls_verify=tls_verify)

    def progress(p: Progress) -> None:
        head = f"layer {p.index}/{p.count} {p.digest[7:19]}"
        if p.state == "start":
            typer.echo(f"{head}: extracting ...", err=True)
        elif p.state == "present":
            typer.echo(f"{head}: already in the store ({_size(p.bytes)}, {p.entries} entries)", err=True)
        else:
            typer.echo(f"{head}: {_size(p.bytes)}, {p.entries} entries in {p.seconds:.2f} s", err=True)

    started = time.monotonic()
    try:
        t = import_image(_store(store), name, source, credentials=credentials, progress=progress,
                         start_command=shlex.split(start_cmd) if start_cmd else None,
                         ready_command=shlex.split(ready_cmd) if ready_cmd else None)
    except TemplateError as exc:
        raise _fail(exc) from None
    typer.echo(f"template {t.name}: {len(t.layers)} layers, {_size(t.size)} from {t.source} "
               f"({t.digest[:19]}) in {time.monotonic() - started:.1f} s")


@template_app.command("build")
def template_build(
    name: str = typer.Argument(..., help="Name of the template to build (replaced if it exists and is unused)."),
    context: Path = typer.Argument(Path("."), help="The build context: where COPY and ADD read their sources."),
    file: Path | None = typer.Option(None, "--file", "-f", help="The build file (default: CONTEXT/Dockerfile)."),
    build_arg: list[str] = typer.Option([], "--build-arg", help="NAME=VALUE for an ARG of the build file "
                                                                 "(repeatable)."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="A host RUN steps may reach through the "
                                                                   "egress broker, as in network.allow "
                                                                   "(repeatable; default: no network)."),
    policy: Path | None = typer.Option(None, "--policy", "-p", help="The RUN sandboxes' policy (TOML or JSON)."),
    timeout: float | None = typer.Option(None, "--timeout", "-t", help="Wall time for each RUN, seconds "
                                                                       "(default 600)."),
    memory: str | None = typer.Option(None, "--memory", "-m", help="Memory limit of each RUN, e.g. 1GiB."),
    runtime: str | None = typer.Option(None, "--runtime", help="Runtime the RUN steps run on (default: "
                                                               "STOCKADE_RUNTIME, else jail)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Run every step again (the cache is still updated)."),
) -> None:
    """Build a template from a Dockerfile subset: FROM, RUN (in a sandbox), COPY/ADD, ENV, ARG, WORKDIR,
    USER, LABEL, START and READY. Each step is cached."""
    import sys

    from ..errors import StockadeError
    from .build import BuildEvent, build
    from .store import TemplateStore

    path = file or context / "Dockerfile"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        typer.echo(f"stockade: cannot read the build file {path}: {exc}", err=True)
        raise typer.Exit(2) from None
    args: dict[str, str] = {}
    for item in build_arg:
        key, eq, value = item.partition("=")
        if not eq:
            value = os.environ.get(key, "")   # --build-arg NAME takes NAME from the environment, as docker's
        args[key] = value
    try:
        pol = _build_policy(policy, timeout, memory, allow_host)
    except StockadeError as exc:
        typer.echo(f"stockade: {exc}", err=True)
        raise typer.Exit(2) from None

    def progress(e: BuildEvent) -> None:
        if e.kind == "step":
            typer.echo(f"[{e.index}/{e.count}] {e.instruction}", err=True)
        elif e.kind == "output":
            sys.stderr.write(e.text)
            sys.stderr.flush()
        elif e.cached:
            typer.echo("  cached", err=True)
        elif e.layer_bytes is not None:
            typer.echo(f"  done in {e.seconds:.2f} s, layer of {_size(e.layer_bytes)}", err=True)

    try:
        result = build(TemplateStore(), name, text, context, policy=pol, runtime=runtime, build_args=args,
                       no_cache=no_cache, source=f"build of {path}", progress=progress)
    except StockadeError as exc:   # (a TemplateError too)
        typer.echo(f"stockade: {exc}", err=True)
        raise typer.Exit(1) from None
    t = result.template
    typer.echo(f"template {t.name}: {len(t.layers)} layers, {_size(t.size)}, built in {result.seconds:.1f} s "
               f"({result.steps} steps: {result.ran} run, {result.cached} from the cache)")


def _build_policy(path: Path | None, timeout: float | None, memory: str | None, hosts: list[str]):  # type: ignore[no-untyped-def]
    """The RUN steps' policy: the file's (or the defaults), with each RUN's time (600 s unless the file or
    --timeout says; a minute more for its sandbox, whose snapshot follows), memory, and the allowed hosts."""
    from ..cli import _load_policy

    policy = _load_policy(path, 600.0 if timeout is None and path is None else timeout, memory, margin=60)
    if hosts:
        policy = policy.with_overrides(network={"mode": "allowlist", "allow": [*policy.network.allow, *hosts]})
    return policy


@template_app.command("base")
def template_base(name: str = typer.Argument("base", help="Name of the template (replaced if unused)."),
                  include: list[str] = typer.Option([], "--include", help="More Debian packages (repeatable)."),
                  code_interpreter: bool = typer.Option(False, "--code-interpreter", help="Add IPython, numpy, "
                                                        "pandas and matplotlib: run_code runs on them."),
                  store: Path | None = STORE) -> None:
    """Make the base template: the host's Debian release with python3, pip, node, npm, git, curl and bash,
    from the host's apt sources (mmdebstrap), user `user` (uid 1000)."""
    from .base import CODE_INTERPRETER, PACKAGES, build_base

    extra = (*CODE_INTERPRETER, *include) if code_interpreter else tuple(include)
    try:
        t = build_base(_store(store), name, packages=(*PACKAGES, *extra),
                       progress=lambda text: typer.echo(text, err=True, nl=False))
    except TemplateError as exc:
        raise _fail(exc) from None
    typer.echo(f"template {t.name}: {_size(t.size)} from {t.source}")


@template_app.command("list")
def template_list(store: Path | None = STORE) -> None:
    """List the templates."""
    templates = _store(store).list()
    if not templates:
        typer.echo("no templates (import one with `stockade template import NAME SOURCE`)")
    for t in templates:
        typer.echo(f"{t.name:<24} {len(t.layers):>3} layers {_size(t.size):>10}  {t.source}")


@template_app.command("show")
def template_show(name: str = typer.Argument(...), store: Path | None = STORE) -> None:
    """Show a template's layers and config (JSON)."""
    s = _store(store)
    try:
        r = s.resolve(name)
    except TemplateError as exc:
        raise _fail(exc) from None
    data = r.template.to_json()
    data["layer_dirs"] = [str(d) for d in r.layer_dirs]
    data["in_use"] = s.in_use(name)
    typer.echo(json.dumps(data, indent=2))


@template_app.command("rm")
def template_rm(name: str = typer.Argument(...), store: Path | None = STORE) -> None:
    """Remove a template (refused while a sandbox uses it); layers no other template uses go too."""
    try:
        removed = _store(store).remove(name)
    except TemplateError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed template {name} ({len(removed)} layers freed)")


@template_app.command("gc")
def template_gc(store: Path | None = STORE,
                build_cache: bool = typer.Option(False, "--build-cache", help="Drop the build cache too (the "
                                                                              "next build runs every step).")
                ) -> None:
    """Remove layers no template uses and leftovers of interrupted imports."""
    s = _store(store)
    records = s.prune_build_cache() if build_cache else []
    removed = s.gc()
    typer.echo(f"{len(removed)} layers removed" + (f", {len(records)} build cache records" if build_cache else ""))
