"""`pip install` inside a sandbox, from a package index on 127.0.0.1 reached through the broker under a
made-up name: the package lands in the sandbox's workspace and every python3 and run_code context sees it."""

from __future__ import annotations

import http.server
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.config import HostConfig
from stockade.environment import is_built

from ..wheels import make_wheel

INDEX_HOST = "pkgs.stockade-index.test"

needs_env = pytest.mark.skipif(not is_built(HostConfig.from_env().sandbox_env),
                               reason="pip in the sandbox comes from the sandbox environment (stockade env build)")


@pytest.fixture
def index(tmp_path: Path, backend_manager) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """A simple index (PEP 503) over plain HTTP on 127.0.0.1; INDEX_HOST resolves to it in the broker."""
    project = tmp_path / "simple" / "stockade-e2e"
    project.mkdir(parents=True)
    whl = make_wheel(project, "stockade_e2e", "3.1", "VALUE = 'from the local index'\n")
    (project / "index.html").write_text(f'<a href="{whl.name}">{whl.name}</a>\n')
    handler = type("Index", (http.server.SimpleHTTPRequestHandler,),
                   {"log_message": lambda *a: None,
                    "__init__": lambda self, *a, **k: http.server.SimpleHTTPRequestHandler.__init__(
                        self, *a, directory=str(tmp_path), **k)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address]:
        return [ipaddress.IPv4Address("127.0.0.1")] if host == INDEX_HOST else []

    previous, backend_manager.resolver = backend_manager.resolver, resolver
    try:
        yield server.server_address[1]
    finally:
        backend_manager.resolver = previous
        server.shutdown()
        server.server_close()


@needs_env
def test_pip_install_from_an_allowed_index_is_importable_everywhere_in_the_sandbox(make_sandbox, index):
    sb = make_sandbox(network={"mode": "allowlist", "allow": [f"{INDEX_HOST}:{index}"],
                               "allow_private": ["127.0.0.1/32"]})
    r = sb.commands.run(f"python3 -m pip install -q --no-cache-dir --index-url http://{INDEX_HOST}:{index}/simple "
                        f"--trusted-host {INDEX_HOST} stockade-e2e", timeout=60)
    assert r.exit_code == 0, r.stderr
    r = sb.commands.run("python3 -c 'import stockade_e2e; print(stockade_e2e.VALUE, stockade_e2e.__file__)'")
    assert r.stdout.startswith("from the local index /home/user/.local/lib/python3."), r.stderr
    execution = sb.run_code("import stockade_e2e\nprint(stockade_e2e.VALUE)")
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout) == "from the local index\n"
    r = sb.commands.run("python3 -m pip show stockade-e2e")
    assert "Location: /home/user/.local/lib/python3." in r.stdout
