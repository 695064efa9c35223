"""`stockade template import|list|show|rm|gc` (mounted by stockade/cli.py as one sub-app)."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import typer

from .errors import TemplateError

template_app = typer.Typer(help="Templates: root filesystems sandboxes start from (imported OCI images).",
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
def template_gc(store: Path | None = STORE) -> None:
    """Remove layers no template uses and leftovers of interrupted imports."""
    removed = _store(store).gc()
    typer.echo(f"{len(removed)} layers removed")
