"""The `base` template (templates/base.py): made by `stockade template base` from the host's apt sources,
which needs the package mirror, so it is made once before the suite (.ci/run does, and sets
STOCKADE_TEST_BASE_TEMPLATE=base, which makes its absence a failure); without the variable these skip.
What agents expect of it works offline: python3 with pip and venv, node with npm, git, curl, bash, a home
of their own that pip and npm install into, and builds on it that run as its root."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade import Sandbox
from stockade.templates import TemplateError, TemplateStore
from stockade.templates.build import build

from .conformance.conftest import RUNTIMES_UNDER_TEST, usable_runtime
from .wheels import make_wheel

BASE = os.environ.get("STOCKADE_TEST_BASE_TEMPLATE", "")
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def base() -> str:
    if not BASE:
        pytest.skip("set STOCKADE_TEST_BASE_TEMPLATE=base after `stockade template base` (.ci/run does)")
    if not ROOT:
        pytest.skip("the base template is root's (.ci/run makes it as root; gVisor templates need root)")
    store = TemplateStore()
    assert store.exists(BASE), f"STOCKADE_TEST_BASE_TEMPLATE={BASE}, but the store has no such template"
    return BASE


@pytest.fixture(params=RUNTIMES_UNDER_TEST)
def runtime(request: pytest.FixtureRequest) -> str:
    return usable_runtime(request.param)


def _sh(sb: Sandbox, script: str, timeout: float = 60) -> str:
    r = sb.commands.run(["bash", "-c", script], timeout=timeout)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout


def test_the_base_has_what_agents_expect(base, runtime):
    with Sandbox.create(template=base, runtime=runtime) as sb:
        out = _sh(sb, "whoami; pwd; python3 -c 'import sys; print(sys.version_info[0])'; "
                      "pip --version | cut -d' ' -f1; node -e 'console.log(1 + 1)'; npm --version >/dev/null && "
                      "echo npm; git --version | cut -d' ' -f1; curl --version | head -1 | cut -d' ' -f1; "
                      "echo $BASH_VERSION | cut -c1; touch ~/mine && echo home; "
                      "python3 -m venv ~/venv && ~/venv/bin/python -c 'print(\"venv\")'")
    assert out.split() == ["user", "/home/user", "3", "pip", "2", "npm", "git", "curl", "5", "home", "venv"], out


def test_pip_and_npm_install_into_the_users_home(base, tmp_path):
    wheel = make_wheel(tmp_path, "stockadebase", "1.0", "def hello():\n    return 'installed'\n")
    with Sandbox.create(template=base) as sb:
        sb.files.write(wheel.name, wheel.read_bytes())
        out = _sh(sb, f"pip install -q --no-index {wheel.name} 2>&1 | grep -v 'Defaulting to user' || true; "
                      "python3 -c 'import stockadebase; print(stockadebase.hello(), stockadebase.__file__)'")
        assert out.strip().startswith("installed /home/user/.local/lib/python3"), out
        sb.files.write("tool/package.json", '{"name": "stockade-tool", "version": "1.0.0", "bin": {"stockade-tool": '
                                            '"cli.js"}}')
        sb.files.write("tool/cli.js", "#!/usr/bin/env node\nconsole.log('tool ran')\n")
        out = _sh(sb, "chmod +x tool/cli.js && npm install -g --offline --no-audit --no-fund ./tool >/dev/null && "
                      "stockade-tool && command -v stockade-tool")
        assert out.split("\n")[:2] == ["tool ran", "/home/user/.npm-global/bin/stockade-tool"], out


def test_a_build_on_the_base_runs_as_its_root(base, tmp_path):
    """The distribution's own tools as root in a build step: a system user, a directory given to it, a
    venv made by it; the template then runs as that user."""
    store = TemplateStore()
    name = f"test-onbase-{secrets.token_hex(4)}"
    text = f"""FROM {base}
USER root
RUN useradd --create-home --shell /bin/bash app && install -d -o app -g app /srv/app && \\
    dpkg-query -W -f '${{Status}}\\n' python3
USER app
WORKDIR /srv/app
RUN python3 -m venv venv && venv/bin/python -c 'import sys; print(sys.prefix)' > prefix
"""
    events: list = []
    try:
        build(store, name, text, tmp_path, progress=events.append, no_cache=True)   # (its output is asserted)
        assert "install ok installed" in "".join(e.text for e in events if e.kind == "output")
        with Sandbox.create(template=name) as sb:
            assert _sh(sb, "whoami; pwd; cat prefix; ls -ld /srv/app | cut -d' ' -f3; touch /srv/app/x && echo ok"
                       ).split() == ["app", "/srv/app", "/srv/app/venv", "app", "ok"]
    finally:
        if store.exists(name):
            store.remove(name)


def test_a_package_installs_as_root_with_its_maintainer_scripts(base, tmp_path):
    """What apt-get install does after the download, offline: dpkg as root unpacks a package into /usr and
    runs its postinst, which makes a system user (useradd: its audit socket answers EAFNOSUPPORT)."""
    store = TemplateStore()
    name = f"test-onbase-{secrets.token_hex(4)}"
    text = f"""FROM {base}
USER root
RUN set -e; d=/tmp/pkg; mkdir -p $d/DEBIAN $d/usr/share/stockade-demo; echo demo > $d/usr/share/stockade-demo/data; \
    printf 'Package: stockade-demo\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@example.test>\\n\
Description: demo\\n' > $d/DEBIAN/control; \
    printf '#!/bin/sh\\nset -e\\nuseradd --system --no-create-home svc\\n' > $d/DEBIAN/postinst; \
    chmod 755 $d/DEBIAN/postinst; dpkg-deb --build $d /tmp/demo.deb >/dev/null; dpkg -i /tmp/demo.deb
USER user
"""
    try:
        build(store, name, text, tmp_path)
        with Sandbox.create(template=name) as sb:
            out = _sh(sb, "cat /usr/share/stockade-demo/data; id -u svc >/dev/null && echo svc; "
                          "dpkg-query -W -f '${Status}' stockade-demo")
        assert out.split("\n")[:2] == ["demo", "svc"] and out.endswith("install ok installed"), out
    finally:
        if store.exists(name):
            store.remove(name)


def test_run_code_runs_on_the_templates_own_python(base, tmp_path):
    """A template whose python3 has IPython (``stockade template base --code-interpreter``, as .ci/run makes
    it) runs code contexts there: its numpy, pandas and matplotlib, and what the user pip-installed, import
    in ``run_code``; one without runs them on the host's python, stdlib backend."""
    from stockade.runtime.jail import template_root

    own = template_root.image_python(TemplateStore().resolve(base))
    with Sandbox.create(template=base) as sb:
        executable = sb.run_code("import sys; sys.executable").text
        if own is None:
            assert executable == repr(f"{template_root.PY_SO_DIR}/python3")
            assert sb.run_code("import IPython").error.name == "ModuleNotFoundError"
            return
        assert executable == repr(own)
        ex = sb.run_code("import numpy as np, pandas as pd\npd.DataFrame({'a': np.arange(3)})")
        assert ex.error is None and "<table" in (ex.results[0].html or ""), ex
        ex = sb.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        assert ex.error is None and any(r.png for r in ex.results), ex
        wheel = make_wheel(tmp_path, "stockadecell", "1.0", "VALUE = 'from the user site'\n")
        sb.files.write(wheel.name, wheel.read_bytes())
        assert sb.commands.run(f"pip install -q --no-index {wheel.name}").exit_code == 0
        assert sb.run_code("import stockadecell; stockadecell.VALUE").text == "'from the user site'"


@pytest.mark.parametrize("exe,link,place,found", [
    ("usr/bin/python3", "python3.11", "usr/lib/python3/dist-packages", "/usr/bin/python3"),
    ("usr/bin/python3", "python3.11", "home/user/.local/lib/python3.11/site-packages", "/usr/bin/python3"),
    ("usr/local/bin/python3", "python3.12", "usr/local/lib/python3.12/site-packages", "/usr/local/bin/python3"),
    ("usr/bin/python3", "python3.11", "usr/lib/python3.12/site-packages", None),    # another python's
    ("usr/bin/python3", "python3.11", None, None),                                  # no IPython
])
def test_which_python_runs_code_contexts(tmp_path, exe, link, place, found):
    from stockade.runtime.jail import template_root
    from stockade.templates import import_image

    from . import template_images as ti

    entries = [ti.entry("symlink", exe, target=link)]
    if place is not None:
        entries.append(ti.entry("file", f"{place}/IPython/__init__.py", b""))
    dirs = sorted({"/".join(e[0].name.split("/")[:i]) for e in entries for i in range(1, e[0].name.count("/") + 1)})
    store = TemplateStore(tmp_path / "store")
    ti.oci_layout(tmp_path / "img", [ti.layer(*[ti.entry("dir", d) for d in dirs], *entries)])
    import_image(store, "t", f"oci:{tmp_path / 'img'}")
    assert template_root.image_python(store.resolve("t")) == found


def test_without_mmdebstrap_it_says_what_to_install(monkeypatch, tmp_path):
    from stockade.templates import base as base_mod

    monkeypatch.setattr(base_mod.shutil, "which", lambda name: None)
    with pytest.raises(TemplateError, match=r"mmdebstrap is not installed \(apt-get install mmdebstrap\)"):
        base_mod.build_base(TemplateStore(tmp_path / "store"), "base")


def test_sources_and_release_come_from_the_host(monkeypatch, tmp_path):
    from stockade.templates import base as base_mod

    if not Path("/etc/os-release").is_file() or "debian" not in Path("/etc/os-release").read_text():
        pytest.skip("not a Debian-based host")
    assert base_mod.host_release()
    assert all(Path(p).is_file() for p in base_mod.host_sources())
    real = Path.read_text

    def fake(self: Path, *a: object, **k: object) -> str:
        return 'ID=fedora\nVERSION_CODENAME=""\nPRETTY_NAME="Fedora"\n' if str(self) == "/etc/os-release" \
            else real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", fake)
    with pytest.raises(TemplateError, match="not Debian-based .*Fedora.*import an image instead"):
        base_mod.host_release()


@pytest.fixture(autouse=True)
def _no_template_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if ROOT and BASE:
        assert not [t.name for t in TemplateStore().list() if t.name.startswith("test-onbase-")]
