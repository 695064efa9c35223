"""The sandbox's Python environment: a virtualenv on the sandbox's own python3, built on the host with
the packages the code interpreter needs, mounted read-only at /opt/stockade/env in every sandbox.

`stockade env build` installs on the host, once. Without it sandboxes still run; the code interpreter
then uses its standard-library fallback (text results only) and `info()` says so.

Every interpreter started here runs isolated (-I: no PYTHON* variables, no user site, no script or
current directory on sys.path) from a fixed directory with the caller's PYTHON* variables removed, so a
pip.py or sitecustomize.py in the caller's directory or PYTHONPATH never runs (as root).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .config import HostConfig
from .errors import SandboxUnavailableError

MOUNT = "/opt/stockade/env"
# The sandbox's own virtualenv, in its workspace: where `pip install` writes. See workspace_venv.
VENV = "/home/user/.local"
# pip's site configuration in VENV (pip reads sys.prefix/pip.conf). The workspace is a tmpfs charged to the
# sandbox's memory: a wheel cache there would hold a second copy of every download.
VENV_PIP_CONF = b"[global]\nno-cache-dir = true\ndisable-pip-version-check = true\n"
# What run_code needs for rich results: IPython's shell, matplotlib's inline backend, and the data stack
# agents reach for first.
DEFAULT_PACKAGES = ("ipython>=8", "matplotlib-inline", "matplotlib", "numpy", "pandas")


def is_built(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() and (path / "bin" / "python3").exists()


def describe(path: Path) -> dict[str, object]:
    """What a built environment holds: its interpreter and version (from pyvenv.cfg) and its packages with
    versions (from the dist-info metadata; nothing of the environment is run on the host)."""
    import importlib.metadata

    cfg: dict[str, str] = {}
    for line in (path / "pyvenv.cfg").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            cfg[key.strip()] = value.strip()
    site = sorted(path.glob("lib/python*/site-packages"))
    packages = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions(path=[str(s) for s in site])
                if d.metadata["Name"]}
    return {"python": cfg.get("executable") or cfg.get("home", "?"), "version": cfg.get("version", "?"),
            "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower()))}


def build(config: HostConfig | None = None, packages: tuple[str, ...] = DEFAULT_PACKAGES,
          log: object = None) -> Path:
    """Create (or update) the environment with the sandbox's interpreter and install ``packages``."""
    from .runtime.jail import rootfs
    from .runtime.jail.config import JailConfig

    config = config or HostConfig.from_env()
    python = rootfs.system_image(JailConfig.from_env().python).python_host
    target = config.sandbox_env
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    building = target.with_name(target.name + ".building")
    if not is_built(target):
        shutil.rmtree(building, ignore_errors=True)
        _run([python, "-I", "-m", "venv", str(building)],
             "create the virtualenv (on Debian/Ubuntu: apt-get install python3-venv)")
        _run([str(building / "bin/python3"), "-I", "-m", "pip", "install", "-q", "--upgrade", "pip"], "upgrade pip")
        relocate(building, (building, target))
        building.rename(target)
    if packages:
        _run([str(target / "bin/python3"), "-I", "-m", "pip", "install", "-q", *packages],
             f"install {' '.join(packages)}")
    relocate(target, (building, target))  # also repairs an environment built before relocation existed
    for d, _, files in os.walk(target):  # sandboxes run as other uids: everything readable
        os.chmod(d, 0o755)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    return target


def relocate(env: Path, host_paths: tuple[Path, ...]) -> None:
    """Point every script and text file of ``env`` at MOUNT, where sandboxes see it, instead of the host
    paths pip wrote (console scripts' shebangs, activate scripts), then check that no file still names a
    host path. (.pyc files are exempt: the import system replaces their recorded file name on load.)"""
    prefixes = sorted((str(p).encode() for p in host_paths), key=len, reverse=True)
    pattern = re.compile(b"|".join(re.escape(p) + rb"(?![\w.-])" for p in prefixes))
    for path in [*(env / "bin").iterdir(), env / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:4096] and pattern.search(data):
            path.write_bytes(pattern.sub(MOUNT.encode(), data))
    left = []
    for d, _, files in os.walk(env):
        for name in files:
            p = os.path.join(d, name)
            if name.endswith(".pyc"):
                continue
            if os.path.islink(p):
                found = pattern.search(os.readlink(p).encode())
            else:
                with open(p, "rb") as f:
                    found = pattern.search(f.read())
            if found:
                left.append(os.path.relpath(p, env))
    if left:
        raise SandboxUnavailableError(f"the sandbox environment {env} still names its host path in "
                                      f"{', '.join(sorted(left)[:10])}: inside a sandbox those would not work",
                                      "fix: remove the environment and run `stockade env build` again")


@dataclass(frozen=True)
class VenvLayout:
    """The files of the workspace virtualenv, as paths inside the sandbox, in creation order."""

    dirs: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]       # (link target, path)
    files: tuple[tuple[str, bytes, int], ...]   # (path, content, mode)


def workspace_venv(env: Path) -> VenvLayout:
    """The virtualenv at VENV that every sandbox with the environment starts with: a few small files, no
    package. Its python is the environment's interpreter, so sys.prefix is VENV (writable) while the
    shared environment's site-packages, read-only at MOUNT, comes after VENV's own on sys.path (a .pth
    file adds it, with its own .pth files). So pip does what it does in any venv with system site
    packages: `pip install X` writes to VENV, its scripts to VENV/bin; a newer version of a shared package
    is installed in VENV and wins on import, pip saying "Not uninstalling X at /opt/stockade/env/...,
    outside environment /home/user/.local" instead of touching the shared one (pip only removes what is
    under sys.prefix); `pip uninstall` of a shared package says the same and removes nothing. VENV's
    site-packages exists from the start, so a running interpreter imports what is installed later (the
    import system rereads a directory whose mtime changed). Every script of the environment's bin (pip,
    ipython, ...) has a twin in VENV/bin, on VENV's python, so whichever one PATH finds sees VENV's
    packages. Cached per environment state (its bin directory and pyvenv.cfg)."""
    key = tuple((env / name).stat().st_mtime_ns for name in ("bin", "pyvenv.cfg"))
    return _workspace_venv(env, key)


@lru_cache(maxsize=4)
def _workspace_venv(env: Path, _key: tuple[int, ...]) -> VenvLayout:
    site = sorted(env.glob("lib/python3*/site-packages"))
    if len(site) != 1:
        raise SandboxUnavailableError(f"the sandbox environment {env} has {len(site)} site-packages directories "
                                      "(expected one)", "fix: remove the environment and run `stockade env build`")
    lib = site[0].relative_to(env)          # lib/python3.X/site-packages
    cfg = [line for line in (env / "pyvenv.cfg").read_text().splitlines()
           if line.partition("=")[0].strip() in ("home", "version", "executable")]
    cfg.append("include-system-site-packages = false")
    dirs = [VENV, f"{VENV}/bin"] + [f"{VENV}/{p}" for p in reversed(lib.parents) if str(p) != "."] + [f"{VENV}/{lib}"]
    symlinks = [(os.readlink(env / "lib64"), f"{VENV}/lib64")] if (env / "lib64").is_symlink() else []
    files = [(f"{VENV}/pyvenv.cfg", ("\n".join(cfg) + "\n").encode(), 0o644),
             (f"{VENV}/pip.conf", VENV_PIP_CONF, 0o644),
             (f"{VENV}/{lib}/_stockade_shared_env.pth",
              f"import site; site.addsitedir({f'{MOUNT}/{lib}'!r})\n".encode(), 0o644)]
    for path in sorted((env / "bin").iterdir()):
        if path.is_symlink():  # python, python3, python3.X: the environment's interpreter, as the env has it
            target = os.readlink(path)
            symlinks.append((target if target.startswith("/") or "/" not in target else f"{MOUNT}/bin/{target}",
                             f"{VENV}/bin/{path.name}"))
        elif path.is_file():
            data = path.read_bytes()
            if b"\0" in data[:4096] or MOUNT.encode() not in data:
                continue  # only scripts that name the environment have a twin
            files.append((f"{VENV}/bin/{path.name}", data.replace(MOUNT.encode(), VENV.encode()),
                          path.stat().st_mode & 0o777))
    return VenvLayout(tuple(dirs), tuple(symlinks), tuple(files))


def isolated_env() -> dict[str, str]:
    """The caller's environment without the variables that make a Python interpreter load other code."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", env=isolated_env())
    if result.returncode != 0:
        raise SandboxUnavailableError(f"cannot {what}: {result.stderr.strip()[-1500:]}")
