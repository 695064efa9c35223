"""Building the sandbox environment (`stockade env build`): no code from the caller's directory or
environment runs, and the result works where sandboxes see it (/opt/stockade/env), not at its host path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stockade import environment
from stockade.errors import SandboxUnavailableError

from .wheels import make_wheel

HOSTILE = "import os\nopen({mark!r}, 'a').write('%d %s\\n' % (os.getpid(), {name!r}))\n"
# Modules an interpreter or pip would pick up from sys.path[0], PYTHONPATH or the startup hooks.
HOSTILE_MODULES = ("pip", "venv", "ensurepip", "py_compile", "sitecustomize", "usercustomize", "startup")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    make_wheel(d, "stockadetiny", "1.0", "def main():\n    print('tiny script ran')\n", script="main")
    return d


def offline_env(wheelhouse: Path) -> dict[str, str]:
    """pip finds packages only in the test's wheel directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def build_env(target: Path, wheelhouse: Path, cwd: Path | None = None, extra_env: dict[str, str] | None = None,
              packages: tuple[str, ...] = ("stockadetiny",)) -> subprocess.CompletedProcess[str]:
    """Runs environment.build in a fresh process (the caller itself isolated with -I, so whatever the
    hostile files record was run by an interpreter stockade started)."""
    env = offline_env(wheelhouse)
    env["STOCKADE_SANDBOX_ENV"] = str(target)
    env["STOCKADE_STATE_DIR"] = str(target.parent / "state")
    env.update(extra_env or {})
    code = ("import sys\nfrom pathlib import Path\nfrom stockade import environment\n"
            "from stockade.config import HostConfig\nfrom stockade.runtime import agent_files\n"
            "from stockade.runtime.jail import rootfs\n"
            "config = HostConfig.from_env()\n"
            f"environment.build(config, packages={packages!r})\n"
            "Path(config.state_dir).mkdir(mode=0o700, exist_ok=True)\n"
            "agent_files.compiled_agent(rootfs.system_image(None).python_host, config.state_dir)\n")
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_env_build_runs_no_code_from_the_callers_directory_or_environment(tmp_path: Path, wheelhouse: Path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    mark = tmp_path / "ran"
    for name in HOSTILE_MODULES:
        (hostile / f"{name}.py").write_text(HOSTILE.format(mark=str(mark), name=name))
    (hostile / "pip").mkdir()  # a package named pip in the current directory, too
    (hostile / "pip" / "__main__.py").write_text(HOSTILE.format(mark=str(mark), name="pip/__main__"))
    (hostile / "pip" / "__init__.py").write_text(HOSTILE.format(mark=str(mark), name="pip/__init__"))
    (hostile / "pth.pth").write_text(f"import os; open({str(mark)!r}, 'a').write('pth\\n')\n")
    user_site = hostile / "lib" / f"python3.{sys.version_info.minor}" / "site-packages"  # via PYTHONUSERBASE
    user_site.mkdir(parents=True)
    (user_site / "usersite.pth").write_text(f"import os; open({str(mark)!r}, 'a').write('user site\\n')\n")
    (user_site / "usercustomize.py").write_text(HOSTILE.format(mark=str(mark), name="user site usercustomize"))
    target = tmp_path / "env"
    r = build_env(target, wheelhouse, cwd=hostile,
                  extra_env={"PYTHONPATH": str(hostile), "PYTHONSTARTUP": str(hostile / "startup.py"),
                             "PYTHONUSERBASE": str(hostile)})
    assert r.returncode == 0, r.stderr
    assert not mark.exists(), f"hostile code ran during the build: {mark.read_text()}"
    assert (target / "lib").is_dir()


def test_built_environment_names_only_its_sandbox_path(tmp_path: Path, wheelhouse: Path):
    """Console scripts' shebangs (and every other file) point at /opt/stockade/env, not the host build path."""
    from stockade.environment import MOUNT

    target = tmp_path / "env"
    r = build_env(target, wheelhouse)
    assert r.returncode == 0, r.stderr
    scripts = [p for p in (target / "bin").iterdir() if p.is_file() and not p.is_symlink()
               and p.read_bytes().startswith(b"#!")]
    assert {"pip", "pip3", "stockadetiny-hello"} <= {p.name for p in scripts}
    for p in scripts:
        assert p.read_text().splitlines()[0] in (f"#!{MOUNT}/bin/python3", f"#!{MOUNT}/bin/python"), p
    for d, _, files in os.walk(target):
        for name in files:
            p = Path(d) / name
            if not name.endswith(".pyc") and not p.is_symlink():
                assert str(tmp_path).encode() not in p.read_bytes(), p
    # an update (a second build with more packages) relocates the new scripts too
    make_wheel(wheelhouse, "stockadetwo", "1.0", "def main():\n    print('two')\n", script="main")
    r = build_env(target, wheelhouse, packages=("stockadetwo",))
    assert r.returncode == 0, r.stderr
    assert (target / "bin" / "stockadetwo-hello").read_text().startswith(f"#!{MOUNT}/bin/python")


@pytest.fixture(scope="module")
def built_env(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """A small sandbox environment (pip and one console script) in a directory every sandbox uid reaches;
    the shared one is never rebuilt by tests."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="stockade-test-env-"))
    top.chmod(0o755)
    r = build_env(top / "env", wheelhouse)
    assert r.returncode == 0, r.stderr
    shutil.copytree(wheelhouse, top / "wheels")
    make_wheel(top / "wheels", "stockadeextra", "2.0", "VALUE = 'installed inside'\n")
    make_wheel(top / "wheels", "stockadetiny", "2.0", "def main():\n    print('tiny 2.0 ran')\n", script="main")
    for d, _, files in os.walk(top / "wheels"):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def run_in_sandbox(top: Path, script: str) -> subprocess.CompletedProcess[str]:
    from .conftest import ROOT, UNPRIVILEGED_GAPS

    policy = top / f"policy-{os.getpid()}.toml"
    gaps = "" if ROOT else f"allow_missing_controls = {UNPRIVILEGED_GAPS!r}\n"
    policy.write_text(gaps + f'[[filesystem.mounts]]\nsource = "{top / "wheels"}"\ntarget = "/wheels"\n')
    policy.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["STOCKADE_SANDBOX_ENV"] = str(top / "env")
    return subprocess.run([sys.executable, "-m", "stockade.cli", "run", "--policy", str(policy), "--", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120, env=env)


def test_pip_and_console_scripts_inside_a_sandbox_are_the_environments_own(built_env: Path):
    r = run_in_sandbox(built_env, "command -v pip; pip --version; python3 -m pip --version; stockadetiny-hello")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "/home/user/.local/bin/pip"  # the workspace venv's, on the environment's pip
    assert lines[1].startswith("pip ") and "from /opt/stockade/env/lib/" in lines[1]
    assert lines[2].startswith("pip ") and "from /opt/stockade/env/lib/" in lines[2]
    assert lines[3] == "tiny script ran"



def _tree(top: Path) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, n): (st.st_size, st.st_mtime_ns) for d, _, files in os.walk(top) for n in files
            if (st := os.lstat(os.path.join(d, n)))}


def test_pip_installs_into_the_workspace_and_upgrades_shadow_the_shared_environment(built_env: Path):
    """`pip install` writes to /home/user/.local; `--upgrade` of a package the read-only environment has
    installs the new version there, which wins on import and on PATH, and never touches the environment;
    `pip uninstall` removes the workspace's copy and says it leaves the environment's alone."""
    before = _tree(built_env / "env")
    shared = f"{environment.MOUNT}/lib/{next((built_env / 'env' / 'lib').glob('python3*')).name}/site-packages"
    pip = "pip install --no-index --find-links /wheels"
    version = "python3 -c 'import importlib.metadata as m, stockadetiny; print(m.version(\"stockadetiny\"), " \
              "stockadetiny.__file__)'"
    r = run_in_sandbox(built_env, f"""set -e
        {pip} -q stockadeextra
        python3 -c 'import stockadeextra; print(stockadeextra.VALUE, stockadeextra.__file__)'
        echo "$VIRTUAL_ENV"; test ! -e ~/.cache/pip && echo no pip cache
        {pip} --user stockadeextra 2>&1 || echo "--user refused"
        echo ---; {pip} --upgrade stockadetiny 2>&1; echo ---
        {version}; command -v stockadetiny-hello; stockadetiny-hello
        echo ---; pip uninstall -y stockadetiny 2>&1; {version}; stockadetiny-hello
        echo ---; pip uninstall -y stockadetiny 2>&1; {version}""")
    assert r.returncode == 0, r.stdout + r.stderr
    extra, upgrade, upgraded, first, second = r.stdout.split("---\n")
    site = "/home/user/.local/lib/python3."
    assert extra.startswith("installed inside " + site) and "/site-packages/stockadeextra.py" in extra
    assert extra.splitlines()[1:3] == ["/home/user/.local", "no pip cache"], extra
    assert "User site-packages are not visible in this virtualenv" in extra and "--user refused" in extra
    assert "Successfully installed stockadetiny-2.0" in upgrade, upgrade
    assert "outside environment /home/user/.local" in upgrade, upgrade  # pip left the shared 1.0 where it is
    assert "Read-only" not in r.stdout + r.stderr and "Permission denied" not in r.stdout + r.stderr
    lines = upgraded.splitlines()
    assert lines[0].startswith("2.0 " + site) and lines[1:] == ["/home/user/.local/bin/stockadetiny-hello",
                                                                 "tiny 2.0 ran"], upgraded
    assert "Successfully uninstalled stockadetiny-2.0" in first, first
    assert first.splitlines()[-2:] == [f"1.0 {shared}/stockadetiny.py", "tiny script ran"], first
    assert f"Not uninstalling stockadetiny at {shared}, outside environment /home/user/.local" in second, second
    assert second.splitlines()[-1] == f"1.0 {shared}/stockadetiny.py", second
    assert _tree(built_env / "env") == before


def test_workspace_venv_layout_follows_the_environment(built_env: Path, tmp_path: Path):
    """The files the runtime places at /home/user/.local come from the built environment: its interpreter,
    a twin of each script on the workspace python, the shared site-packages after the workspace's; a script
    the environment gains later (an `env build` while a server runs) gets its twin at the next start."""
    import shutil

    env = tmp_path / "env"
    shutil.copytree(built_env / "env", env, symlinks=True)
    venv = environment.workspace_venv(env)
    files = {path: content for path, content, _ in venv.files}
    links = dict((path, target) for target, path in venv.symlinks)
    assert links["/home/user/.local/bin/python3"] == os.readlink(env / "bin" / "python3")
    lib = next((env / "lib").glob("python3*")).name
    assert f"/home/user/.local/lib/{lib}/site-packages" in venv.dirs
    assert files[f"/home/user/.local/lib/{lib}/site-packages/_stockade_shared_env.pth"] == \
        f"import site; site.addsitedir('{environment.MOUNT}/lib/{lib}/site-packages')\n".encode()
    cfg = files["/home/user/.local/pyvenv.cfg"].decode()
    assert "include-system-site-packages = false" in cfg and "home = " in cfg and environment.MOUNT not in cfg
    for name in ("pip", "stockadetiny-hello"):
        assert files[f"/home/user/.local/bin/{name}"].startswith(b"#!/home/user/.local/bin/python3\n"), name
    assert not any(environment.MOUNT.encode() in c for p, c in files.items() if "/bin/" in p)
    script = env / "bin" / "stockadelater"
    script.write_text(f"#!{environment.MOUNT}/bin/python3\nprint('later')\n")
    os.utime(env / "bin", ns=(1, (env / "bin").stat().st_mtime_ns + 1))  # as a new install would move it
    later = {path for path, _, _ in environment.workspace_venv(env).files}
    assert "/home/user/.local/bin/stockadelater" in later
    (env / "lib64").unlink()  # a broken environment (rebuilt: a new pyvenv.cfg) is refused by name
    shutil.rmtree(env / "lib")
    os.utime(env / "pyvenv.cfg", ns=(1, (env / "pyvenv.cfg").stat().st_mtime_ns + 1))
    with pytest.raises(SandboxUnavailableError, match="0 site-packages directories"):
        environment.workspace_venv(env)
