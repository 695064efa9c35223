"""`stockade doctor`: what the jail needs from this host, what is in force, and how to fix what is not.

``Sandbox.create()`` reports a failed start through ``explain_start_failure``, which runs the same checks,
so a user sees the same sentence in both places and never a raw bwrap error on its own.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import HostConfig
from .errors import SandboxUnavailableError, StockadeError
from .runtime.jail.config import JailConfig


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True   # False: the sandbox still runs, with a weaker control


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_userns() -> Check:
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return Check("user namespaces", False, "kernel.unprivileged_userns_clone = 0",
                     "sysctl -w kernel.unprivileged_userns_clone=1")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return Check("user namespaces", False, "user.max_user_namespaces = 0",
                     "sysctl -w user.max_user_namespaces=15000")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" and os.geteuid() != 0:
        return Check("user namespaces", False,
                     "Ubuntu's AppArmor restricts unprivileged user namespaces "
                     "(kernel.apparmor_restrict_unprivileged_userns = 1)",
                     "add an AppArmor profile allowing 'userns' for the bwrap binary stockade uses "
                     "(see docs/architecture.md), or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return Check("user namespaces", True, "allowed")


def check_bwrap(jail: JailConfig) -> tuple[Check, str | None]:
    from .runtime.jail import bwrap

    try:
        found = bwrap.locate(jail.bwrap)
    except SandboxUnavailableError as exc:
        return Check("bubblewrap", False, str(exc).split("\n")[0], exc.advice), None
    probe = subprocess.run([found.path, "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib64",
                            "/lib64", "--symlink", "usr/lib", "/lib", "--symlink", "usr/bin", "/bin",
                            "--", "/bin/true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return Check("bubblewrap", False, f"{found.describe()} cannot create a sandbox: "
                     f"{probe.stderr.strip()[:300]}", _advice_for(probe.stderr)), None
    return Check("bubblewrap", True, found.describe()), found.path


def check_seccomp() -> Check:
    from .runtime.jail import seccomp

    status = _read("/proc/self/status") or ""
    if "\nSeccomp:" not in status:  # the field exists only on kernels built with seccomp
        return Check("seccomp", False, "the kernel reports no seccomp support", "use a kernel with CONFIG_SECCOMP")
    try:
        size = len(seccomp.filter_bpf())
    except SandboxUnavailableError as exc:
        return Check("seccomp", False, str(exc).split("\n")[0], exc.advice)
    return Check("seccomp", True, f"filter compiled by libseccomp ({size // 8} BPF instructions)")


def check_cgroups(jail: JailConfig) -> list[Check]:
    from .runtime import cgroups

    host = cgroups.detect(jail.cgroup_parent)
    version = f"cgroup v{host.version}" if host.version else "no cgroup filesystem"
    checks = []
    for c in cgroups.CONTROLLERS:
        if c in host.parents:
            checks.append(Check(f"cgroup {c}", True, f"{version}, under {host.parents[c]}"))
        else:
            checks.append(Check(f"cgroup {c}", False, f"{version}: {host.problems.get(c, 'unavailable')}",
                                "run as root, or set STOCKADE_CGROUP_PARENT to a cgroup delegated to this "
                                "user; a policy may accept the gap with allow_missing_controls",
                                required=False))
    return checks


def check_proc_view(jail: JailConfig) -> Check:
    """What the sandbox sees of the host through /proc: masking is bwrap mounts, so it holds unprivileged."""
    from .errors import SandboxUnavailableError
    from .runtime.jail import rootfs, workspace

    files, dirs = rootfs.masked_proc()
    clocks = ("uptime, btime and the monotonic clocks are the sandbox's own (a time namespace)"
              if os.geteuid() == 0 and os.path.exists("/proc/self/ns/time") else
              "uptime, btime and the monotonic clocks are the host's (a time namespace needs root here)")
    lxcfs = " (an lxcfs mount exists on this host; stockade does not use it)" if os.path.isdir(
        "/var/lib/lxcfs/proc") else ""
    try:   # (the host makes the sandbox's mounts where it makes its disk workspace: host_mounts.py)
        host_made = workspace.choose(os.geteuid() == 0, jail.workspace).disk
    except SandboxUnavailableError:
        host_made = False
    if host_made:
        mounts = ("mountinfo shows no host uid, device, devtmpfs size or host directory: /dev, /dev/shm and the "
                  "generated files are on mounts the host makes as root, bound host directories show as "
                  "overlays named by descriptor (only device numbers remain, as stat() gives them)")
    else:
        mounts = ("mountinfo shows the host uid in the options of bwrap's tmpfs mounts (/dev, /dev/shm, the "
                  "generated files), the host devtmpfs size of /dev's nodes, and the host paths of bound "
                  "directories (as root, mounts the host makes hide these)")
    return Check("/proc masking", True, f"{len(files)} host /proc files read empty, {len(dirs)} directories "
                 "empty and read-only; meminfo, cpuinfo, stat, loadavg and boot_id show the sandbox (MemTotal = "
                 "limits.memory, CPUs = limits.cpus rounded up, also as the affinity mask); the cgroup namespace "
                 "is rooted at the sandbox's cgroup" + lxcfs + "; " + clocks + "; sysinfo() answers "
                 "limits.memory (the agent, through a seccomp user notification); " + mounts + ". Not hidden: "
                 "/proc/uptime's idle time (summed over the host), /proc/sys values that scale with the host "
                 "(gVisor hides all of these)")


def check_privilege(jail: JailConfig) -> Check:
    if os.geteuid() == 0:
        low, high = jail.uid_range
        return Check("privilege", True, f"root: each sandbox runs as its own host uid from {low}-{high}")
    return Check("privilege", False, f"not root (uid {os.geteuid()}): every sandbox shares your host uid, "
                 "so sandboxes are separated by namespaces only", "run stockade as root for per-sandbox uids",
                 required=False)


def check_workspace(config: HostConfig, jail: JailConfig) -> list[Check]:
    """What backs /home/user, /tmp and a template sandbox's writable root, and what the fallback gives up."""
    from .runtime.jail import rootfs, workspace

    try:
        backing = workspace.choose(os.geteuid() == 0, jail.workspace)
    except StockadeError as exc:
        return [Check("workspace", False, str(exc), getattr(exc, "advice", ""))]
    shm = ("/dev/shm stays a tmpfs of filesystem.tmp_size charged to the memory cgroup (shared memory is "
           "memory)")
    if backing.disk:
        data = config.data_dir if config.data_dir.exists() else config.data_dir.parent
        fstype = workspace.filesystem_type(data)
        if fstype in workspace.MEMORY_FILESYSTEMS:
            ws = Check("workspace", False, f"{rootfs.HOME} and /tmp are ext4 images under {config.data_dir}"
                       f"/workspaces, but that is on {fstype}: the images' pages are memory, so filling them "
                       "may end in an OOM kill, not ENOSPC", "put STOCKADE_DATA_DIR on a disk filesystem",
                       required=False)
        else:
            ws = Check("workspace", True, f"{rootfs.HOME} and /tmp are ext4 images of filesystem.workspace_size "
                       f"and filesystem.tmp_size on the host's disk ({config.data_dir}/workspaces, loop devices, "
                       "sparse): ENOSPC past them, not charged to limits.memory; " + shm)
        return [ws, Check("template root size", True, "a template sandbox's writable root (its copy-on-write layer) "
                      f"is on its workspace image: it and {rootfs.HOME} together end in ENOSPC at "
                      "filesystem.workspace_size, on disk")]
    checks = [Check("workspace", False, f"{rootfs.HOME}, /tmp and /dev/shm are tmpfs ({backing.reason}), "
                    "charged to the memory cgroup: filling them past limits.memory ends in an OOM kill, not "
                    "ENOSPC, so filesystem.workspace_size is only a ceiling below limits.memory",
                    "run as root on a host with loop devices and mkfs.ext4 (e2fsprogs) for disk images; or "
                    "raise limits.memory above filesystem.workspace_size + filesystem.tmp_size where a "
                    "sandbox must use its whole workspace", required=False)]
    if os.geteuid() == 0:
        checks.append(Check("template root size", True, "a template sandbox's writable root (its copy-on-write "
                            "layer) is a tmpfs of filesystem.workspace_size: ENOSPC past it, charged to the "
                            "sandbox's memory cgroup"))
    else:
        checks.append(Check("template root size", False, "a template sandbox's writable root (its copy-on-write "
                            f"layer under {config.state_dir}/overlay) is on disk with no size limit when not root: "
                            "only the state directory's free space bounds it", "run as root (the layer is then "
                            "bounded by filesystem.workspace_size), or put the state directory on a filesystem "
                            "of its own", required=False))
    return checks


def check_image_owners(config: HostConfig) -> Check:
    """Whether a template's files show with the image's owners (runtime/idmap.py)."""
    name = "template file owners"
    if os.geteuid() != 0:
        return Check(name, False, "not root: every file of a template is the store owner's, so the sandbox user "
                     "may write (in its own layer) even what the image gave root", "run as root for the image's "
                     "owners (idmapped layers)", required=False)
    from .runtime import idmap

    data = config.data_dir if config.data_dir.exists() else config.data_dir.parent
    why = idmap.probe(data)
    if why is not None:
        return Check(name, False, f"no idmapped mount on {data}'s filesystem ({why}): the image's files show as "
                     "unmapped ids (nobody), readable as their modes allow, writable by no sandbox user",
                     "use Linux >= 5.19 with the data directory on ext4, xfs, btrfs or tmpfs", required=False)
    return Check(name, True, "idmapped layers: the image's user owns the files the image gave it, root's stay "
                 "root's, the store keeps them at ids no host user has")


def run_checks(config: HostConfig | None = None, jail: JailConfig | None = None) -> list[Check]:
    config = config or HostConfig.from_env()
    jail = jail or JailConfig.from_env()
    checks = [check_userns()]
    bwrap_check, _ = check_bwrap(jail)
    checks.append(bwrap_check)
    checks.append(check_seccomp())
    checks += check_cgroups(jail)
    checks.append(check_proc_view(jail))
    checks.append(check_privilege(jail))
    from .environment import is_built
    from .runtime.jail import rootfs

    env_ok = is_built(config.sandbox_env)
    state = "is built" if env_ok else "is not built: run_code falls back to plain-text results"
    checks.append(Check("sandbox environment", env_ok, f"{config.sandbox_env} {state}", "stockade env build",
                        required=False))

    checks += check_workspace(config, jail)
    checks.append(check_image_owners(config))
    try:
        img = rootfs.system_image(jail.python)
        checks.append(Check("agent python", True, f"{img.python_host} (mounted read-only)"))
    except StockadeError as exc:
        checks.append(Check("agent python", False, str(exc).split("\n")[0], getattr(exc, "advice", "")))
    checks.append(check_gvisor(config))
    return checks


def check_gvisor(config: HostConfig) -> Check:
    """Whether the gvisor runtime can run here, on which platform, and why not. Not required: the jail is
    the default runtime; this says what `runtime="gvisor"` would get."""
    from .runtime.gvisor import runsc

    name = "runtime gvisor"
    try:
        found = runsc.probe(runsc.locate(os.environ.get("STOCKADE_RUNSC") or None), config.state_dir,
                            os.environ.get("STOCKADE_GVISOR_PLATFORM") or None)
    except StockadeError as exc:
        return Check(name, False, str(exc).split("\n")[0], getattr(exc, "advice", ""), required=False)
    tried = "; ".join(f"{p}: {why}" for p, why in found.platforms.items())
    summary = (f"{found.path} ({found.version}) runs on the {found.platform} platform [{tried}]; the sandbox's "
               "system calls go to gVisor's kernel, not the host's")
    if os.geteuid() != 0:
        return Check(name, False, f"{summary}; rootless (an ordinary user): no cgroups (memory, pids, cpu), the "
                     "workspace in memory, no templates", "run as root for gVisor with the policy's limits",
                     required=False)
    return Check(name, True, summary)


def verdict(checks: list[Check]) -> str:
    if any(not c.ok and c.required for c in checks):
        return "FAIL: this host cannot run stockade sandboxes; fix the items marked FAIL."
    if any(not c.ok for c in checks):
        return "OK with weaker controls: sandboxes run; the items marked WEAK are not enforced."
    return "OK: every control is in force."


def _advice_for(stderr: str) -> str:
    s = stderr.lower()
    if "uid map" in s or "no permissions to creat" in s or "operation not permitted" in s:
        return check_userns().fix or ("this host forbids user namespaces for this user "
                                      "(container without --privileged, or an LSM policy); run `stockade doctor`")
    if "no such file" in s:
        return "a path the sandbox needs is missing on this host; run `stockade doctor`"
    return "run `stockade doctor` to see which requirement this host misses"


def explain_start_failure(stderr: str, returncode: int | None) -> SandboxUnavailableError:
    """The clear error for a sandbox that did not start: doctor's first failing check, then the detail."""
    try:
        failing = [c for c in run_checks() if not c.ok and c.required]
    except Exception:  # the explanation must never hide the failure
        failing = []
    detail = f"(bwrap said: {stderr[:500]})" if stderr else f"(bwrap exited with {returncode})"
    if failing:
        first = failing[0]
        return SandboxUnavailableError(f"cannot start a sandbox: {first.name}: {first.detail} {detail}",
                                       f"fix: {first.fix}" if first.fix else "")
    return SandboxUnavailableError(f"cannot start a sandbox {detail}", f"fix: {_advice_for(stderr)}")
