"""Memory, pids and cpu limits through cgroups, v1 or v2, detected at run time.

v2 (unified): one directory per sandbox under ``/sys/fs/cgroup/<parent>`` with memory.max,
memory.swap.max, pids.max and cpu.max. v1: one directory per sandbox in each controller's hierarchy
(memory.limit_in_bytes and memsw, pids.max, cpu.cfs_quota_us). A hybrid host (v1 controllers plus an
empty v2 mount) is driven as v1.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupHost:
    """What this host offers: the version and, per usable controller, the directory sandboxes go under."""

    version: int | None                   # 1, 2, or None when no cgroup filesystem is mounted
    parents: dict[str, Path] = field(default_factory=dict)   # controller -> parent dir (writable)
    problems: dict[str, str] = field(default_factory=dict)   # controller -> why it is unusable

    @property
    def usable(self) -> tuple[str, ...]:
        return tuple(c for c in CONTROLLERS if c in self.parents)


def _mounts() -> list[tuple[str, str, set[str]]]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = (right.split() + ["", ""])[:3]
            mountpoint = left.split()[4].replace("\\040", " ")
            if fstype in ("cgroup", "cgroup2"):
                found.append((fstype, mountpoint, set(options.split(","))))
    return found


@cache
def detect(parent_name: str = "stockade", root: str | None = None) -> CgroupHost:
    """Probe the host. ``root`` overrides /sys/fs/cgroup (tests drive the v2 code on a fake tree)."""
    if root is not None:
        return _detect_v2(Path(root), parent_name)
    mounts = _mounts()
    for fstype, mountpoint, _ in mounts:
        if fstype == "cgroup2" and mountpoint == "/sys/fs/cgroup":
            return _detect_v2(Path(mountpoint), parent_name)
    v1 = {c: Path(mp) for fstype, mp, opts in mounts if fstype == "cgroup" for c in CONTROLLERS if c in opts}
    if not v1:
        return CgroupHost(None, problems={c: "no cgroup filesystem with this controller is mounted"
                                          for c in CONTROLLERS})
    host = CgroupHost(1)
    for c in CONTROLLERS:
        if c not in v1:
            host.problems[c] = f"the {c} controller is not mounted (cgroup v1)"
            continue
        parent = v1[c] / parent_name
        problem = _prepare_dir(parent)
        if problem:
            host.problems[c] = problem
        else:
            host.parents[c] = parent
    return host


def _detect_v2(root: Path, parent_name: str) -> CgroupHost:
    host = CgroupHost(2)
    try:
        available = set((root / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return CgroupHost(2, problems={c: f"cannot read cgroup.controllers: {exc.strerror}" for c in CONTROLLERS})
    parent = root / parent_name
    problem = _prepare_dir(parent)
    for c in CONTROLLERS:
        if c not in available:
            host.problems[c] = f"the {c} controller is not enabled on this cgroup v2 host"
        elif problem:
            host.problems[c] = problem
        else:
            try:  # a v2 controller works in a child only when every ancestor delegates it
                _write(root / "cgroup.subtree_control", f"+{c}")
                _write(parent / "cgroup.subtree_control", f"+{c}")
                host.parents[c] = parent
            except OSError as exc:
                host.problems[c] = f"cannot delegate {c} to {parent}: {exc.strerror}"
    return host


def v1_cpuset_mount() -> Path | None:
    """Where the v1 cpuset hierarchy is mounted, if it is."""
    return next((Path(mp) for fstype, mp, opts in _mounts() if fstype == "cgroup" and "cpuset" in opts), None)


def fill_v1_cpuset(mountpoint: Path, parent_name: str) -> str | None:
    """Make ``parent_name`` (and each directory above it) in a v1 cpuset hierarchy with its parent's CPUs and
    memory nodes. runsc gives every container a cpuset cgroup under the parent and creates missing
    directories itself, but a v1 cpuset directory starts with none of either and does not take its parent's
    (unless cgroup.clone_children, a host-wide setting), so writing the container's CPUs fails with EACCES.
    Returns why it could not, or None."""
    current = mountpoint
    for part in (p for p in parent_name.split("/") if p):
        child = current / part
        problem = _prepare_dir(child)
        if problem:
            return problem
        for name in ("cpuset.cpus", "cpuset.mems"):
            try:
                if not (child / name).read_text().strip():
                    _write(child / name, (current / name).read_text().strip())
            except OSError as exc:
                return f"cannot set {child / name} from {current / name}: {exc.strerror}"
        current = child
    return None


def _prepare_dir(path: Path) -> str | None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror} (needs root, or a delegated STOCKADE_CGROUP_PARENT)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable by this user"
    return None


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Cgroup:
    """The cgroup(s) of one sandbox: one directory (v2) or one per controller hierarchy (v1)."""

    def __init__(self, host: CgroupHost, name: str) -> None:
        self.host = host
        self.name = name
        self.dirs = sorted({parent / name for parent in host.parents.values()})

    def create(self, memory: int, pids: int, cpus: float) -> None:
        for d in self.dirs:
            d.mkdir()
        try:
            self._limit(memory, pids, cpus)
        except OSError:
            self.remove_dirs()
            raise

    def _limit(self, memory: int, pids: int, cpus: float) -> None:
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        parents = self.host.parents
        if self.host.version == 2:
            d = next(iter(self.dirs))
            if "memory" in parents:
                _write(d / "memory.max", str(memory))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
            if "pids" in parents:
                _write(d / "pids.max", str(pids))
            if "cpu" in parents:
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            return
        if "memory" in parents:
            d = parents["memory"] / self.name
            _write(d / "memory.limit_in_bytes", str(memory))
            if (d / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                _write(d / "memory.memsw.limit_in_bytes", str(memory))
        if "pids" in parents:
            _write(parents["pids"] / self.name / "pids.max", str(pids))
        if "cpu" in parents:
            d = parents["cpu"] / self.name
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return found

    def memory_peak(self) -> int | None:
        if "memory" not in self.host.parents:
            return None
        d = self.host.parents["memory"] / self.name
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((d / name).read_text())
            except (OSError, ValueError):
                continue
        return None

    def memory_usage(self) -> tuple[int, int] | None:
        """(bytes charged now, of which page cache): memory.current and memory.stat's ``file`` (v2), or
        memory.usage_in_bytes and ``total_cache`` (v1). None without a memory cgroup."""
        if "memory" not in self.host.parents:
            return None
        d = self.host.parents["memory"] / self.name
        v2 = self.host.version == 2
        try:
            used = int((d / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
            stat = dict(line.split(" ", 1) for line in (d / "memory.stat").read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            return None
        return used, int(stat.get("file" if v2 else "total_cache", 0))

    def oom_kills(self) -> int | None:
        """The memory cgroup's own count of OOM kills: ``oom_kill`` in memory.events (v2) or
        memory.oom_control (v1, Linux >= 4.13)."""
        if "memory" not in self.host.parents:
            return None
        d = self.host.parents["memory"] / self.name
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (d / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
        return None

    async def destroy(self) -> None:
        """Kill whatever is left in the cgroup and remove its directories."""
        for _ in range(200):
            if self.host.version == 2 and self.dirs and (self.dirs[0] / "cgroup.kill").exists():
                try:
                    _write(self.dirs[0] / "cgroup.kill", "1")
                except OSError:
                    pass
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left and self.remove_dirs():
                return
            await asyncio.sleep(0.005)
        raise OSError(f"cgroup {self.name} still busy after teardown")

    def remove_dirs(self) -> bool:
        done = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # still populated (exiting zombies): try again shortly
                done = False
        return done


def stale_names(host: CgroupHost) -> Iterable[str]:
    """Names of every sandbox cgroup under stockade's parents (live or left by a dead process)."""
    names: set[str] = set()
    for parent in host.parents.values():
        try:
            names.update(e.name for e in os.scandir(parent) if e.is_dir())
        except OSError:
            continue
    return sorted(names)
