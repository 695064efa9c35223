"""The sandbox's Python environment: a virtualenv on the sandbox's own python3, built on the host with
the packages the code interpreter needs, mounted read-only at /opt/stockade/env in every sandbox.

Sandboxes have no network, so nothing is installed inside them: `stockade env build` installs on the
host, once. Without it sandboxes still run; the code interpreter then uses its standard-library
fallback (text results only) and `info()` says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .config import HostConfig
from .errors import SandboxUnavailableError

MOUNT = "/opt/stockade/env"
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

    config = config or HostConfig.from_env()
    python = rootfs.system_image(config.python).python_host
    target = config.sandbox_env
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not is_built(target):
        tmp = target.with_name(target.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        _run([python, "-m", "venv", str(tmp)], "create the virtualenv (on Debian/Ubuntu: apt-get install python3-venv)")
        _run([str(tmp / "bin/python3"), "-m", "pip", "install", "-q", "--upgrade", "pip"], "upgrade pip")
        tmp.rename(target)
    _run([str(target / "bin/python3"), "-m", "pip", "install", "-q", *packages], f"install {' '.join(packages)}")
    for d, _, files in os.walk(target):  # sandboxes run as other uids: everything readable
        os.chmod(d, 0o755)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    return target


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SandboxUnavailableError(f"cannot {what}: {result.stderr.strip()[-1500:]}")
