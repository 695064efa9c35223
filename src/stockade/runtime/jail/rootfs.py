"""The sandbox's filesystem: an explicit allowlist of host system paths, read-only, plus generated files.

Never bound: /root, /home, /var, /run, /srv, /mnt, /media, /opt, /usr/local, /boot, /sys, the host's /etc
as a whole, or any host socket. What python3, sh and coreutils need comes from /usr (Debian and Ubuntu
merge /bin, /lib into /usr) and a handful of /etc files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from ...errors import SandboxUnavailableError

SANDBOX_UID = 1000
SANDBOX_GID = 1000
HOME = "/home/user"
AGENT_DIR = "/opt/stockade/agent"
BIN_DIR = "/opt/stockade/bin"      # save-artifact
LIB_DIR = "/opt/stockade/lib"      # stockade_artifacts, importable by any python in the sandbox
PYTHON_MOUNT = "/opt/stockade/python"

USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "libexec", "share")
TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Host /etc entries a program needs to start (dynamic loader, alternatives, certificates, time zone).
ETC_ALLOW = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "ssl/certs",
             "ca-certificates", "mime.types", "protocols", "services", "nsswitch.conf", "shells",
             "python3", f"python3.{sys.version_info.minor}", "inputrc", "terminfo", "fonts")

PASSWD = (f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
          f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox user:{HOME}:/bin/sh\n"
          f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"
HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"
HOSTNAME = "sandbox\n"
# No resolver: the sandbox has no network to resolve names on.
RESOLV_CONF = "# no DNS inside a stockade sandbox\n"


@dataclass(frozen=True)
class SystemImage:
    """The read-only system part of the root, computed once per process: host paths bound read-only at
    the same path, symlinks (merged /usr), and the interpreter the agent runs on."""

    binds: tuple[str, ...]               # host paths bound read-only at the same path
    links: tuple[tuple[str, str], ...]   # (target, path): symlinks made in the root
    python: str          # the interpreter the agent runs on, as a path inside the sandbox
    python_host: str     # the same interpreter on the host (for compiling the agent)
    python_prefix_fd_source: str | None  # host prefix bound at PYTHON_MOUNT when not under /usr
    real_binds: tuple[str, ...]          # binds with their symlinks resolved (the views' sources)

    @property
    def args(self) -> tuple[str, ...]:
        """The same as bwrap arguments."""
        args: list[str] = []
        for kind, first, second in self._entries:
            args += [kind, first, second]
        return tuple(args)

    @property
    def view_sources(self) -> list[str]:
        """The top-level host directories the binds come from (/usr, /etc)."""
        return sorted({"/" + b.split("/")[1] for b in self.real_binds})

    def args_through(self, through: Callable[[str], str]) -> tuple[str, ...]:
        """``args`` with each bind's source (its symlinks resolved) read where ``through`` says: a view of
        it (host_mounts.py), so the sandbox's mountinfo shows the view's filesystem, not the host's disk."""
        real = dict(zip(self.binds, self.real_binds, strict=True))
        args: list[str] = []
        for kind, first, second in self._entries:
            args += [kind, through(real[first]) if kind == "--ro-bind" else first, second]
        return tuple(args)

    @property
    def _entries(self) -> list[tuple[str, str, str]]:
        return [*(("--symlink", t, p) for t, p in self.links), *(("--ro-bind", b, b) for b in self.binds)]


@cache
def system_image(python_override: str | None = None) -> SystemImage:
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for path in [f"/usr/{name}" for name in USR_DIRS] + [f"/{name}" for name in TOP_LINKS]:
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append(path)
    binds += [f"/etc/{name}" for name in ETC_ALLOW if os.path.exists(f"/etc/{name}")]
    python, host_python, prefix = _python(python_override)
    return SystemImage(tuple(binds), tuple(links), python, host_python, prefix,
                       tuple(os.path.realpath(b) for b in binds))


def _python(override: str | None) -> tuple[str, str, str | None]:
    """The agent's interpreter: STOCKADE_PYTHON, else the system python3 under /usr (already in the
    image), else this process's own interpreter prefix mounted read-only at /opt/stockade/python."""
    if override:
        real = os.path.realpath(override)
        if not real.startswith("/usr/"):
            raise SandboxUnavailableError(f"STOCKADE_PYTHON={override} resolves outside /usr",
                                          "fix: point it at an interpreter under /usr, or unset it")
        return override, override, None
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3", "/usr/bin/python3", None
    prefix = sys.base_prefix
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(prefix + "/"):
        raise SandboxUnavailableError("no python3 for the in-sandbox agent",
                                      "fix: install python3 under /usr (apt-get install python3-minimal)")
    return PYTHON_MOUNT + exe[len(prefix):], exe, prefix


def generated_files() -> dict[str, str]:
    """Sandbox path -> content of the /etc files written for every sandbox."""
    return {"/etc/passwd": PASSWD, "/etc/group": GROUP, "/etc/hosts": HOSTS, "/etc/hostname": HOSTNAME,
            "/etc/resolv.conf": RESOLV_CONF}


def sandbox_env(extra: dict[str, str], env_bin: str | None = None) -> dict[str, str]:
    path = f"/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:{BIN_DIR}"
    env = {"PATH": f"{env_bin}:{path}" if env_bin else path, "HOME": HOME, "PYTHONPATH": LIB_DIR, "USER": "user",
           "LOGNAME": "user", "SHELL": "/bin/sh", "LANG": "C.UTF-8", "TERM": "dumb", "TMPDIR": "/tmp",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


# /proc entries that describe the host, not the sandbox: runc's masked and read-only set (acpi, asound,
# interrupts, kcore, keys, latency_stats, timer_list, timer_stats, sched_debug, scsi, bus, fs, irq; bwrap
# already makes sys and sysrq-trigger read-only) plus the kernel build, the host's disks, memory layout,
# modules and counters. Files are covered by /dev/null (reads return nothing), directories by an empty
# read-only tmpfs. Only entries this kernel has are covered (bwrap cannot mount over a missing one), and
# only files others may read: the sandbox's uid is no one to the host, and each bind costs bwrap a
# mountinfo parse (~0.2-0.5 ms), so root-only files (kcore, kmsg, slabinfo, ...) stay as they are.
MASKED_PROC_FILES = ("kcore", "keys", "key-users", "latency_stats", "timer_list", "timer_stats", "sched_debug",
                     "interrupts", "softirqs", "version", "config.gz", "kallsyms", "modules", "cmdline",
                     "diskstats", "partitions", "swaps", "zoneinfo", "buddyinfo", "pagetypeinfo", "vmallocinfo",
                     "slabinfo", "vmstat", "iomem", "ioports", "mtrr", "locks", "kmsg", "kpagecount",
                     "kpageflags", "kpagecgroup")
MASKED_PROC_DIRS = ("acpi", "asound", "scsi", "bus", "fs", "irq", "driver", "pressure", "tty/driver")


@cache
def masked_proc() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(files, directories) under /proc to mask, those present on this kernel."""
    return (tuple(f"/proc/{n}" for n in MASKED_PROC_FILES if _world_readable(f"/proc/{n}")),
            tuple(f"/proc/{n}" for n in MASKED_PROC_DIRS if os.path.isdir(f"/proc/{n}")))


def _world_readable(path: str) -> bool:
    try:
        return os.stat(path).st_mode & 0o004 != 0
    except OSError:
        return False


def sized_proc_files(memory: int, cpus: int, boot_id: str, btime: int | None = None) -> dict[str, str]:
    """/proc files programs read to size themselves, showing the sandbox's limits (limits.memory, the
    CPU count the agent's affinity mask gives) instead of the host's. Static: written once at start.
    ``btime``: the sandbox's own boot time where it has a time namespace (else the host's)."""
    kib = memory // 1024
    meminfo = "".join(f"{k + ':':<16}{v:>8} kB\n" for k, v in (
        ("MemTotal", kib), ("MemFree", kib), ("MemAvailable", kib), ("Buffers", 0), ("Cached", 0),
        ("SwapCached", 0), ("Active", 0), ("Inactive", 0), ("SwapTotal", 0), ("SwapFree", 0), ("Shmem", 0),
        ("Slab", 0), ("SReclaimable", 0)))
    cpuinfo = "".join(f"processor\t: {i}\nvendor_id\t: stockade\nmodel name\t: sandbox virtual CPU\n"
                      f"physical id\t: 0\nsiblings\t: {cpus}\ncore id\t\t: {i}\ncpu cores\t: {cpus}\n\n"
                      for i in range(cpus))
    zeros = " 0" * 10
    # glibc's get_nprocs (os.cpu_count) counts these cpuN lines when /sys is absent, as it is here.
    stat = (f"cpu {zeros}\n" + "".join(f"cpu{i}{zeros}\n" for i in range(cpus))
            + f"intr 0\nctxt 0\nbtime {_btime() if btime is None else btime}\nprocesses 0\nprocs_running 1\n"
              "procs_blocked 0\n")
    return {"/proc/meminfo": meminfo, "/proc/cpuinfo": cpuinfo, "/proc/stat": stat,
            "/proc/loadavg": "0.00 0.00 0.00 1/1 1\n", "/proc/sys/kernel/random/boot_id": boot_id + "\n"}


@cache
def _btime() -> str:
    """The host's boot time, for a sandbox without a time namespace (its /proc/uptime is the host's, and ps
    computes process start times from both)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return line.split()[1]
    return "0"
