"""Starting and tearing down a jailed sandbox.

Order of a start: lease a host uid (root only) -> mount the workspace images (root: ``workspace.py``) and a
template's overlay -> create the cgroup -> spawn bwrap inside the cgroup, as
the sandbox uid, with the agent as the sandbox's PID 1 (so the cgroup namespace bwrap unshares is rooted
at the sandbox's own cgroup) -> read the agent's host pid from bwrap's info fd -> hello/ready on the
channel, where the agent sets its rlimits. The agent runs nothing before the hello, so no process in the
sandbox ever escapes the cgroup or the rlimits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ... import environment
from ...agent import protocol
from ...config import HostConfig
from ...errors import PolicyError, SandboxUnavailableError, UnenforceableError
from ...templates import Lease, TemplateStore
from ...templates.users import ImageUser

if TYPE_CHECKING:
    from ...templates.snapshot import SnapshotSource
from .. import cgroups
from ..agent_files import AGENT_ZIP, SAVE_ARTIFACT, compiled_agent
from ..base import Runtime, RuntimeSandbox, SandboxSpec
from ..channel import AgentChannel
from ..locks import Lock, lock_is_stale
from . import bwrap as bwrap_mod
from . import host_mounts, rootfs, seccomp, template_root, workspace
from .config import JailConfig
from .egress import FdPassingListener
from .uids import UidAllocator, UidLease

START_TIMEOUT = 15.0
# pids the cgroup allows above limits.pids, which user code cannot use (each command's RLIMIT_NPROC stops
# it at limits.pids): the agent can always start the next command and kill a runaway one.
AGENT_PIDS_HEADROOM = 16


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)  # reaches bwrap only through pass_fds; closed after the spawn
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class JailRuntime(Runtime):
    name = "jail"

    def __init__(self, config: HostConfig | None = None, jail: JailConfig | None = None) -> None:
        self.config = config or HostConfig.from_env()
        self.jail = jail or JailConfig.from_env()
        self.privileged = os.geteuid() == 0
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755 if self.privileged else 0o700)
        _check_owned(self.config.state_dir, private=not self.privileged)
        (self.config.state_dir / "sandboxes").mkdir(exist_ok=True, mode=0o700)
        self.net_dir = self.config.state_dir / "net"  # per-sandbox broker sockets
        self.overlay_dir = self.config.state_dir / "overlay"  # template sandboxes' writable layers
        self.workspace_dir = self.config.state_dir / "workspace"  # mount points of the workspace images
        self.workspace = workspace.choose(self.privileged, self.jail.workspace)
        self._templates: TemplateStore | None = None
        self.bwrap = bwrap_mod.locate(self.jail.bwrap)
        if self.privileged:
            self.bwrap = bwrap_mod.copy_for_other_uids(self.bwrap, self.config.state_dir)
        self.image = rootfs.system_image(self.jail.python)
        self.seccomp_bpf = seccomp.filter_bpf()
        self.agent_files = compiled_agent(self.image.python_host, self.config.state_dir)
        self.cgroups = cgroups.detect(self.jail.cgroup_parent)
        self.uids = UidAllocator(self.config.state_dir, self.jail.uid_range) if self.privileged else None
        # build steps: a block of host ids each (template_root.BUILD_IDS), the block's first its root
        self.id_blocks = (UidAllocator(self.config.state_dir, template_root.BUILD_ID_RANGE, template_root.BUILD_IDS)
                          if self.privileged else None)
        # As root, each sandbox gets a time namespace whose clocks start near zero: uptime, btime and the
        # monotonic clocks then say nothing of the host's. (Setting its offsets needs CAP_SYS_TIME over the
        # owning user namespace, which an unprivileged caller has only inside bwrap's, too late.)
        self.unshare_time = _libc_unshare() if self.privileged and os.path.exists("/proc/self/ns/time") else None
        self.host_cpus = sorted(os.sched_getaffinity(0))
        self._cpu_turn = itertools.count()  # spreads the sandboxes' affinity masks over the host's CPUs
        self.sandbox_env = self.config.sandbox_env if environment.is_built(self.config.sandbox_env) else None
        if self.sandbox_env and self.privileged and not bwrap_mod.reachable_by_anyone(str(self.sandbox_env), False):
            raise SandboxUnavailableError(f"the sandbox environment {self.sandbox_env} is not reachable by "
                                          "unprivileged uids", "fix: chmod o+x the directories above it")

    @property
    def templates(self) -> TemplateStore:
        if self._templates is None:
            self._templates = TemplateStore(self.config.data_dir / "templates")
        return self._templates

    def _lock_path(self, sandbox_id: str) -> Path:
        return self.config.state_dir / "sandboxes" / f"{sandbox_id}.lock"

    async def sweep_stale(self) -> list[str]:
        """Remove the cgroups, locks and broker sockets of sandboxes whose stockade process died without
        tearing them down (their processes died with it: bwrap --die-with-parent)."""
        swept = set()
        names = set(cgroups.stale_names(self.cgroups))
        names.update(p.name.removesuffix(".lock") for p in (self.config.state_dir / "sandboxes").glob("*.lock"))
        net = {d.name: d for d in self.net_dir.iterdir()} if self.net_dir.is_dir() else {}
        names.update(net)
        overlays = {d.name: d for d in self.overlay_dir.iterdir()} if self.overlay_dir.is_dir() else {}
        names.update(overlays)
        workspaces = {d.name: d for d in self.workspace_dir.iterdir()} if self.workspace_dir.is_dir() else {}
        names.update(workspaces)
        for name in sorted(names):
            lock = self._lock_path(name)
            if not lock_is_stale(lock):
                continue
            with contextlib.suppress(OSError):
                await cgroups.Cgroup(self.cgroups, name).destroy()
                swept.add(name)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            if name in net:
                shutil.rmtree(net[name], ignore_errors=True)
                swept.add(name)
            if name in overlays:  # a template sandbox's copy-on-write layer (and its mount, as root)
                template_root.remove(overlays[name])
                swept.add(name)
            if name in workspaces:  # its disk images' mounts: unmounting frees the loop devices and images
                workspace.remove(workspaces[name])
                swept.add(name)
        if self.privileged:
            swept.update(self._sweep_images())
        return sorted(swept)

    def _sweep_images(self) -> set[str]:
        """What a start killed while making a workspace image can leave: the image under its name (for the
        moment between creating and unlinking it) or, on a kernel without LOOP_CONFIGURE, a loop device
        not yet set to clear itself. Only those of sandboxes whose owner is gone (by their lock)."""
        swept = set()
        data = self.config.data_dir
        for image in workspace.named_images(data):
            name = image.name.rsplit("-", 1)[0]
            if lock_is_stale(self._lock_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    image.unlink()
                swept.add(name)
        mounted = workspace.mounted_devices()
        for dev, backing in workspace.loop_devices(data).items():
            name = Path(backing.removesuffix(" (deleted)")).name.rsplit("-", 1)[0]
            # a device set to clear itself is one a start is about to mount (maybe of another state dir
            # sharing this data dir), never an orphan: only one without autoclear is detached
            if (dev not in mounted and not workspace.autoclears(dev) and lock_is_stale(self._lock_path(name))
                    and workspace.detach(dev)):
                swept.add(name)
        return swept

    def leftovers(self, sandbox_id: str, described: Mapping[str, object] | None = None) -> list[str]:
        # Processes are found by the sandbox's host uid and mount namespace, which only ``described`` knows.
        # The kernel reuses both once the sandbox is gone (a new sandbox may get the same namespace inode and
        # uid at once), so a process started after this process stopped the sandbox is not one of its.
        left: list[str] = []
        uid = mnt = None
        stopped = _STOPPED.get(sandbox_id)
        if described is not None:
            namespaces = described.get("namespaces")
            host_uid = described.get("host_uid")
            uid = host_uid if described.get("uid_isolation") and isinstance(host_uid, int) else None
            mnt = namespaces.get("mnt") if isinstance(namespaces, dict) else None
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                ours_by_uid = uid is not None and entry.stat().st_uid == uid
                ours_by_ns = mnt is not None and os.stat(f"/proc/{entry.name}/ns/mnt").st_ino == mnt
                if (ours_by_uid or ours_by_ns) and stopped is not None and _started_at(entry.name) > stopped:
                    continue
                if ours_by_uid:
                    left.append(f"process {entry.name} runs as the sandbox uid {uid}")
                if ours_by_ns:
                    left.append(f"process {entry.name} is in the sandbox's mount namespace")
            except OSError:
                continue
        left += [f"cgroup {d}" for d in cgroups.Cgroup(self.cgroups, sandbox_id).dirs if d.exists()]
        for path, what in ((self._lock_path(sandbox_id), "lock file"), (self.net_dir / sandbox_id, "broker socket "
                                                                          "directory"),
                           (self.overlay_dir / sandbox_id, "template overlay (writable layer) directory"),
                           (self.workspace_dir / sandbox_id, "workspace mount directory")):
            if path.exists():
                left.append(f"{what} {path}")
        left += [f"mount {p}" for p in workspace.mounts_under(self.workspace_dir / sandbox_id)]
        left += [f"mount {p}" for p in workspace.mounts_under(self.overlay_dir / sandbox_id)]
        left += [f"loop device {dev} backed by {backing}"
                 for dev, backing in workspace.loop_devices(self.config.data_dir, sandbox_id).items()]
        left += [f"workspace image {p}" for p in workspace.named_images(self.config.data_dir)
                 if p.name.startswith(f"{sandbox_id}-")]
        return left

    async def start(self, spec: SandboxSpec) -> JailSandbox:
        policy = spec.policy
        missing = [c for c in cgroups.CONTROLLERS
                   if c not in self.cgroups.parents and c not in policy.allow_missing_controls]
        if missing:
            reasons = "; ".join(f"{c}: {self.cgroups.problems.get(c, 'unavailable')}" for c in missing)
            raise UnenforceableError(
                f"cannot enforce limits.{'/'.join(missing)} on this host ({reasons})",
                "fix: run as root or give stockade a delegated cgroup (STOCKADE_CGROUP_PARENT); or accept "
                f"the weaker sandbox with allow_missing_controls = {json.dumps(missing)} in the policy file "
                f"(SDK: Sandbox.create(policy={{\"allow_missing_controls\": {json.dumps(missing)}}})). "
                "Run `stockade doctor` for details.")
        sandbox = JailSandbox(self, spec)
        try:
            await sandbox._start(spec.envs)
        except BaseException:
            await sandbox.stop()
            raise
        return sandbox


class JailSandbox(RuntimeSandbox):
    def __init__(self, runtime: JailRuntime, spec: SandboxSpec) -> None:
        self.runtime = runtime
        self.layout = runtime.layout
        self.files = dict(spec.files)
        self.id = spec.id
        self.policy = policy = spec.policy
        self.egress = FdPassingListener(runtime.net_dir / spec.id, spec.egress) if spec.egress else None
        self.template = spec.template
        self.build_step = spec.build_step
        self.lease: Lease | None = None
        self.overlay: template_root.OverlayRoot | None = None
        self.image_user: ImageUser | None = None    # a template's user (templates/users.py)
        self.workspace: workspace.DiskWorkspace | None = None
        self.mounts: host_mounts.HostMounts | None = None   # as root: /dev, /dev/shm and the files, the host's
        # In a template sandbox the host's python runs only the agent (through its own loader); the
        # sandbox environment (a venv of the host's python) is not bound there.
        self.use_env = runtime.sandbox_env is not None and spec.template is None
        self.python = (template_root.python_argv(template_root.PY_SO_DIR) if spec.template else
                       [f"{environment.VENV}/bin/python3" if runtime.sandbox_env else runtime.image.python])
        self.lock: Lock | None = None
        self.uid: UidLease | None = None
        self.cgroup: cgroups.Cgroup | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent_pidfd: int | None = None
        self.agent_host_pid: int | None = None
        self.namespaces: dict[str, int] = {}
        # The CPUs the agent (and so every process) is pinned to: as many as limits.cpus, rounded up, so
        # nproc, os.cpu_count() and thread pools size themselves to the sandbox. The quota stays the limit.
        n = min(len(runtime.host_cpus), max(1, math.ceil(policy.limits.cpus)))
        start = next(runtime._cpu_turn) * n
        self.cpus = sorted({runtime.host_cpus[(start + i) % len(runtime.host_cpus)] for i in range(n)})
        self.btime: int | None = None  # the sandbox's boot time, when it has a time namespace
        self._stopped = False
        self._stop_lock = asyncio.Lock()

    # ---- start ---------------------------------------------------------------------------------
    async def _start(self, envs: Mapping[str, str]) -> None:
        rt = self.runtime
        if self.template is not None:
            self.lease = template_root.lease(rt.templates, self.template)
            self.template_config = self.lease.resolved.config
            if (own := template_root.image_python(self.lease.resolved)) is not None:
                self.python, self.python_script = [own], "interpreter.py"
            if self.build_step and rt.id_blocks is not None:
                self.image_user = template_root.build_user(self.lease.resolved)
            else:
                self.image_user = template_root.sandbox_user(self.lease.resolved, self.files,
                                                             build_step=self.build_step)
        elif self.build_step:
            raise PolicyError("template", "a build step runs from a template")
        self.lock = Lock(rt.config.state_dir / "sandboxes" / f"{self.id}.lock")
        if rt.uids is not None and rt.id_blocks is not None:
            self.uid = rt.id_blocks.acquire() if self.build_step else rt.uids.acquire()
        fs = self.policy.filesystem
        if rt.workspace.disk and self.uid is not None:
            self.workspace = workspace.DiskWorkspace(rt.config.state_dir, rt.config.data_dir, self.id, self.uid.uid,
                                                     fs.workspace_size, fs.tmp_size)
            self.mounts = host_mounts.HostMounts(self.workspace.base, self.uid.uid, fs.tmp_size)
            disk, mounts, views = self.workspace, self.mounts, self._host_views()

            def create() -> None:
                disk.create(self.lease is not None)
                mounts.create(views)

            # (in a thread: mounting and, at teardown, unmounting a filesystem are system calls of ms)
            await asyncio.to_thread(create)
            if self.egress is not None:   # its socket's directory, bound in, named by no host path
                self.egress.socket_dir = mounts.run / "net"
        if self.lease is not None:
            ws, resolved = self.workspace, self.lease.resolved
            if self.uid is not None and self.build_step:
                assert self.image_user is not None
                id_maps = template_root.build_id_maps(resolved.layer_infos, self.uid.uid, self.image_user)
            elif self.uid is not None and self.image_user is not None:
                id_maps = template_root.layer_id_maps(resolved.layer_infos, self.image_user, self.uid.uid, self.uid.uid)
            else:
                id_maps = None
            self.overlay = template_root.OverlayRoot(rt.config.state_dir, self.id, resolved.layer_dirs,
                                                     self.uid.uid if self.uid is not None else None,
                                                     fs.workspace_size, (ws.upper, ws.work) if ws else None, id_maps)
            await asyncio.to_thread(self.overlay.create)
        lim = self.policy.limits
        if rt.cgroups.parents:
            self.cgroup = cgroups.Cgroup(rt.cgroups, self.id)
            self.cgroup.create(lim.memory, lim.pids + AGENT_PIDS_HEADROOM, lim.cpus)
        if self.egress is not None:
            self.egress.start()
            if self.mounts is None:   # (under <run> it is closed already) the sandbox's bwrap alone may pass
                os.chown(self.egress.socket_dir, -1, self.uid.uid if self.uid is not None else -1)
                os.chmod(self.egress.socket_dir, 0o710 if self.uid is not None else 0o700)
        time_offsets = self._time_offsets() if rt.unshare_time is not None else None
        host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        stderr_fd = os.memfd_create("stockade-bwrap-stderr", os.MFD_CLOEXEC)
        fds: list[int] = []
        # a build step's user namespace maps its whole block of ids: bwrap waits while the host writes that
        block_w: int | None = None
        if self.build_step and self.uid is not None:
            block_r, block_w = os.pipe2(os.O_CLOEXEC)
            fds.append(block_r)
        try:
            argv = self._argv(agent_sock.fileno(), info_w, fds, block_r if block_w is not None else None)
            self.proc = subprocess.Popen(  # noqa: S603 - argv is built here, not from input
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_fd,
                pass_fds=(agent_sock.fileno(), info_w, *fds), start_new_session=True,
                preexec_fn=_enter(self.cgroup, self.uid.uid if self.uid is not None else None, rt.unshare_time,
                                  time_offsets))
        finally:
            agent_sock.close()
            os.close(info_w)
            for fd in fds:
                os.close(fd)
        try:
            try:
                info = await asyncio.wait_for(_read_all(info_r), START_TIMEOUT)
            finally:
                os.close(info_r)
            try:
                if not info:
                    raise ValueError("no info")
                details = json.loads(info)
                child = int(details["child-pid"])
                if block_w is not None:
                    assert self.uid is not None and self.image_user is not None
                    template_root.write_build_maps(child, self.uid.uid, self.image_user)
                    os.write(block_w, b"1")
            except (ValueError, KeyError, TypeError, OSError):   # (OSError: bwrap died before its maps)
                if block_w is not None:
                    os.close(block_w)   # unmapped, bwrap fails at once
                    block_w = None
                await self._wait_bwrap(2.0)
                raise self._start_failure(stderr_fd) from None
        finally:
            if block_w is not None:
                os.close(block_w)
        self.namespaces = {k.removesuffix("-namespace"): v for k, v in details.items() if k.endswith("-namespace")}
        self.agent_host_pid = child
        try:
            self.agent_pidfd = os.pidfd_open(child)
        except ProcessLookupError:  # bwrap failed a step after it reported its child (a mount), and it died
            await self._wait_bwrap(2.0)
            raise self._start_failure(stderr_fd) from None
        with contextlib.suppress(ProcessLookupError):  # bwrap failed: the hello below reports it
            os.sched_setaffinity(child, self.cpus)
        reader, writer = await asyncio.open_unix_connection(sock=host_sock)
        self.channel = AgentChannel(reader, writer)
        try:
            env = rootfs.sandbox_env({}, f"{environment.VENV}/bin:{environment.MOUNT}/bin" if self.use_env else None)
            if self.use_env:  # as an activated venv: tools that look for one (uv, poetry) find the workspace's
                env["VIRTUAL_ENV"] = environment.VENV
            home = rt.layout.home
            if self.lease is not None:  # the image's environment and working directory, under the caller's
                home = template_root.apply_image_config(self.lease.resolved.config, env, self.image_user) or home
            env.update(envs)
            # The agent lowers its own rlimits before it runs anything (lowering needs no privilege,
            # and the same agent does it in every runtime); every process it starts inherits them.
            rlimits = {"nofile": lim.open_files, "fsize": lim.file_size, "core": 0}
            # RLIMIT_NPROC counts per uid per user namespace only from Linux 5.14: before, it would
            # count the host uid's processes everywhere.
            nproc = lim.pids if _kernel_at_least(5, 14) else 0
            # sysinfo() is the host kernel's: the agent answers it with limits.memory (user notification, 5.0+)
            sysinfo = (*seccomp.sysinfo_notifier(), lim.memory) if _kernel_at_least(5, 0) else None
            await self.agent.hello(env, rlimits, nproc, home, START_TIMEOUT, sysinfo=sysinfo)
            if self.mounts is not None:   # bwrap is done with them: the sandbox's copies are the last
                with contextlib.suppress(OSError):   # (else teardown unmounts them, as after a crash)
                    self.mounts.detach()
        except SandboxUnavailableError:
            await self._wait_bwrap(2.0)
            raise self._start_failure(stderr_fd) from None
        finally:
            os.close(stderr_fd)

    def _host_views(self) -> list[str]:
        """The host directories the sandbox's binds come from (HostMounts shows them as overlays)."""
        rt = self.runtime
        if self.template is not None:
            so_dir, stdlib, _ = template_root.host_python(rt.image.python_host, rt.config.state_dir)
            return [str(so_dir), stdlib]
        views = rt.image.view_sources   # (/usr and /etc)
        if self.use_env:
            views.append(str(rt.sandbox_env))
        if rt.image.python_prefix_fd_source:
            views.append(rt.image.python_prefix_fd_source)
        return views

    def _time_offsets(self) -> bytes:
        """The time namespace's offsets: its monotonic and boot-time clocks start at about 1 s (an offset may
        not make a clock negative, and the spawn takes a moment), so btime is now less that."""
        mono, boot = time.clock_gettime(time.CLOCK_MONOTONIC), time.clock_gettime(time.CLOCK_BOOTTIME)
        self.btime = round(time.time() - (boot - int(boot) + 1))
        return f"monotonic {-(int(mono) - 1)} 0\nboottime {-(int(boot) - 1)} 0\n".encode()

    def _argv(self, channel_fd: int, info_fd: int, fds: list[int], block_fd: int | None = None) -> list[str]:
        rt, fs = self.runtime, self.policy.filesystem

        def data(name: str, content: bytes) -> str:
            fd = _memfd(name, content)
            fds.append(fd)
            return str(fd)

        mounts = self.mounts
        through = mounts.through if mounts is not None else (lambda path: path)

        def ro_file(path: str, content: bytes, mode: int = 0o444) -> list[str]:
            """A file the sandbox reads at ``path``: on the host's tmpfs as root, else a copy in bwrap's."""
            name = path.rsplit("/", 1)[1]
            if mounts is not None:
                return ["--ro-bind", mounts.file(name, content, mode), path]
            return [*(["--perms", f"{mode:04o}"] if mode != 0o444 else []), "--ro-bind-data", data(name, content),
                    path]

        user = self.image_user
        argv = [rt.bwrap.path,
                "--unshare-user", "--uid", str(user.uid if user else rootfs.SANDBOX_UID),
                "--gid", str(user.gid if user else rootfs.SANDBOX_GID),
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup",
                "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]
        if block_fd is None:
            argv += ["--disable-userns"]
        else:
            # (bwrap refuses --disable-userns with --userns-block-fd; the seccomp filter refuses every new
            # namespace to a build step as to any sandbox: unshare, setns, clone's namespace flags, clone3)
            argv += ["--userns-block-fd", str(block_fd)]
            if user is not None and user.uid == 0:   # the image's root, over its own block of ids only
                for cap in template_root.BUILD_ROOT_CAPS:
                    argv += ["--cap-add", cap]
        if self.overlay is not None:
            so_dir, stdlib, stdlib_inside = template_root.host_python(rt.image.python_host, rt.config.state_dir)
            argv += [*self.overlay.bwrap_args(), "--ro-bind", through(str(so_dir)), template_root.PY_SO_DIR,
                     "--ro-bind", through(stdlib), stdlib_inside]
        else:
            if mounts is not None:   # an empty root of root's tmpfs, not bwrap's (whose owner mountinfo shows)
                argv += ["--bind", str(mounts.root), "/"]
            argv += rt.image.args_through(mounts.through) if mounts is not None else rt.image.args
        prefix = rt.image.python_prefix_fd_source
        if self.overlay is None and prefix and mounts is not None:
            argv += ["--ro-bind", mounts.through(prefix), rootfs.PYTHON_MOUNT]
        elif self.overlay is None and prefix:
            fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
            fds.append(fd)
            argv += ["--ro-bind-fd", str(fd), rootfs.PYTHON_MOUNT]
        if self.use_env:
            argv += ["--ro-bind", through(str(rt.sandbox_env)), environment.MOUNT]
        if self.egress is not None:  # the only way out of the network namespace
            argv += ["--ro-bind", str(self.egress.socket_dir), os.path.dirname(rt.layout.broker)]
        # As root a template's /home/user is part of its root: what the image (or a snapshot) has there shows,
        # and writes land in the writable layer, which is on the workspace's image (or tmpfs) of that size.
        home = None if self.overlay is not None and self.overlay.owner is not None else rootfs.HOME
        argv += ["--proc", "/proc",
                 *(mounts.dev_args() if mounts is not None else ["--dev", "/dev", *workspace.shm_args(fs.tmp_size)]),
                 *(self.workspace.bwrap_args(home) if self.workspace is not None else
                   workspace.tmpfs_args(home, fs.workspace_size, fs.tmp_size))]
        if self.use_env and rt.sandbox_env is not None:  # the workspace venv pip installs into (environment.py)
            venv = environment.workspace_venv(rt.sandbox_env)
            for d in venv.dirs:
                argv += ["--perms", "0755", "--dir", d]
            for target, path in venv.symlinks:
                argv += ["--symlink", target, path]
            for path, content, mode in venv.files:
                argv += ["--perms", f"{mode:04o}", "--file", data(path.rsplit("/", 1)[1], content), path]
        masked_files, masked_dirs = rootfs.masked_proc()
        for path in masked_files:
            argv += ["--dev-bind", mounts.null if mounts is not None else "/dev/null", path]
        for path in masked_dirs:
            argv += (["--ro-bind", str(mounts.empty), path] if mounts is not None else
                     ["--tmpfs", path, "--remount-ro", path])
        sized = rootfs.sized_proc_files(self.policy.limits.memory, len(self.cpus), str(uuid.uuid4()), self.btime)
        for path, text in sized.items():
            argv += ro_file(path, text.encode())
        for path, text in rootfs.generated_files().items():
            if self.build_step and path in ("/etc/passwd", "/etc/group"):
                continue   # the image's own, which the step may change (template_root.build_user)
            if path not in self.files:  # (a template's /etc/passwd; bwrap cannot bind data twice on one file)
                argv += ro_file(path, text.encode())
        for path, content in self.files.items():
            argv += ro_file(path, content)
        for name, code in rt.agent_files.items():
            argv += ro_file(f"{rootfs.AGENT_DIR}/{name}", code)
        helper = (Path(protocol.__file__).parent / "stockade_artifacts.py").read_bytes()
        argv += [*ro_file(f"{rootfs.LIB_DIR}/stockade_artifacts.py", helper),
                 *ro_file(f"{rootfs.BIN_DIR}/save-artifact", SAVE_ARTIFACT, 0o555)]
        for i, mount in enumerate(fs.mounts):
            problem = _mount_source_problem(mount.source, self.uid is not None)
            if problem:
                raise PolicyError(f"filesystem.mounts.{i}.source", problem)
            argv += ["--bind" if mount.mode == "rw" else "--ro-bind", mount.source, mount.target]
        agent_zip = f"{rootfs.AGENT_DIR}/{AGENT_ZIP}"
        if self.overlay is None:
            argv += ["--remount-ro", "/", "--chdir", rootfs.HOME, "--clearenv",
                     "--info-fd", str(info_fd), "--seccomp", data("seccomp", rt.seccomp_bpf),
                     "--", rt.image.python, "-E", "-s", "-S", "-B", agent_zip, str(channel_fd)]
            return argv
        # A template's root stays writable (its writes go to the sandbox's own upper dir). The agent's
        # python finds its standard library through PYTHONHOME (not -E); the agent's own environment
        # reaches no command (each gets the hello's).
        argv += ["--chdir", rootfs.HOME, "--clearenv", "--setenv", "PYTHONHOME", template_root.PY_DIR,
                 "--info-fd", str(info_fd), "--seccomp", data("seccomp", rt.seccomp_bpf),
                 "--", *template_root.agent_argv(template_root.PY_SO_DIR, agent_zip, channel_fd)]
        self.overlay.prepare(argv)
        return argv

    def _start_failure(self, stderr_fd: int) -> SandboxUnavailableError:
        from ...doctor import explain_start_failure

        size = os.lseek(stderr_fd, 0, os.SEEK_END)
        text = os.pread(stderr_fd, min(size, 4096), 0).decode("utf-8", "replace").strip()
        return explain_start_failure(text, self.proc.returncode if self.proc else None)

    async def _wait_bwrap(self, timeout: float) -> None:
        if self.proc is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.005)

    # ---- run time ------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return (not self._stopped and self.proc is not None and self.proc.poll() is None
                and not self.channel.closed)

    def describe(self) -> dict[str, object]:
        rt = self.runtime
        return {
            "runtime": rt.name,
            "bwrap": rt.bwrap.describe(),
            "host_uid": self.uid.uid if self.uid else os.geteuid(),
            "uid_isolation": self.uid is not None,
            "cgroup_version": rt.cgroups.version,
            "controls": {c: c in rt.cgroups.parents for c in cgroups.CONTROLLERS},
            "seccomp": True,
            "python_env": environment.MOUNT if self.use_env else None,
            "python_venv": environment.VENV if self.use_env else None,  # where pip installs (the workspace's)
            # what run_code uses: IPython from the sandbox environment, else the stdlib fallback
            "code_interpreter": "ipython" if self.use_env else "stdlib",
            "template": self.template,
            # a template's user (uid, gid, name) and how the image's file owners show (idmapped or not)
            "user": ({"uid": self.image_user.uid, "gid": self.image_user.gid, "name": self.image_user.name}
                     if self.image_user else {"uid": rootfs.SANDBOX_UID, "gid": rootfs.SANDBOX_GID, "name": "user"}),
            "image_owners": self.overlay.image_owners if self.overlay else None,
            # /home/user and /tmp: ext4 images of their sizes on the host's disk ("disk image"), or tmpfs
            # of those sizes charged to the memory cgroup ("tmpfs"); /dev/shm is a tmpfs either way
            "workspace_backing": "disk image" if self.workspace is not None else "tmpfs",
            # /dev, /dev/shm, the generated files and the host directories bound in: on mounts the host made
            # as root (host_mounts.py, nothing of the host in mountinfo) or bwrap's own (unprivileged)
            "host_mounts": self.mounts is not None,
            # a template sandbox's writable root: as root bounded by filesystem.workspace_size (on the
            # workspace's image, shared with /home/user; or a tmpfs of its own); unprivileged on the state
            # dir's disk, unbounded
            "root_write_limit": ("read-only" if not self.template else
                                 self.policy.filesystem.workspace_size if self.uid is not None else None),
            "time_namespace": rt.unshare_time is not None,  # uptime, btime, monotonic clocks: the sandbox's
            "agent_host_pid": self.agent_host_pid,
            "namespaces": dict(self.namespaces),
        }

    def snapshot_source(self) -> SnapshotSource:
        host = (self.uid.uid, self.uid.uid) if self.uid is not None else (os.geteuid(), os.getegid())
        block = self.uid.uid if self.build_step and self.uid is not None else None
        return template_root.snapshot_source(self.runtime.templates, self.overlay, self.lease, self.image_user, host,
                                             block)

    def memory_peak(self) -> int | None:
        return self.cgroup.memory_peak() if self.cgroup else None

    def memory_usage(self) -> tuple[int, int] | None:
        return self.cgroup.memory_usage() if self.cgroup else None

    def oom_kills(self) -> int | None:
        return self.cgroup.oom_kills() if self.cgroup else None

    # ---- teardown ------------------------------------------------------------------------------
    async def stop(self) -> None:
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if hasattr(self, "channel"):
                self.channel.close()
            # SIGKILL to the PID namespace's init: the kernel kills every process in the namespace.
            if self.agent_pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.agent_pidfd, signal.SIGKILL)
                os.close(self.agent_pidfd)
                self.agent_pidfd = None
            try:
                if self.proc is not None:
                    if self.proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            self.proc.kill()
                    await _wait_exit(self.proc)
                if self.egress is not None:
                    await self.egress.stop()
                if self.cgroup is not None:
                    await self.cgroup.destroy()
                if self.overlay is not None:
                    self.overlay.remove()
                if self.workspace is not None:  # after the overlay, whose upper dir is on it
                    await asyncio.to_thread(self.workspace.remove)
            finally:
                _STOPPED[self.id] = time.clock_gettime(time.CLOCK_BOOTTIME)
                while len(_STOPPED) > 4096:
                    del _STOPPED[next(iter(_STOPPED))]
                if self.lease is not None:
                    self.lease.release()
                if self.uid is not None:
                    self.uid.release()
                if self.lock is not None:
                    self.lock.release()


# sandbox id -> the host's boot-time clock when a runtime of this process stopped it (for leftovers())
_STOPPED: dict[str, float] = {}


def _started_at(pid: str) -> float:
    """When a process started, in seconds of the host's boot-time clock (/proc/PID/stat's starttime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


@cache
def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _check_owned(path: Path, private: bool) -> None:
    """The state dir holds locks and the compiled agent: it must be ours, and private unless we are root
    (a predictable /tmp path could have been created by someone else first)."""
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or (private and st.st_mode & 0o077) or not os.path.isdir(path):
        raise SandboxUnavailableError(
            f"the state directory {path} is not a directory owned by uid {os.geteuid()}"
            + (" with mode 0700" if private else ""),
            "fix: remove it, or set STOCKADE_STATE_DIR to a directory only you can write")


def _mount_source_problem(source: str, other_uid: bool) -> str | None:
    """Why ``source`` cannot be mounted, or None. bwrap opens it as the sandbox's host uid, and that uid
    reads the files under it with ordinary permissions: as root that uid is an unprivileged stranger."""
    if not os.path.exists(source):
        return f"{source} does not exist on this host"
    if other_uid and not bwrap_mod.reachable_by_anyone(source, need_exec=False):
        return (f"{source} is not reachable by the sandbox's unprivileged host uid (a directory above it "
                "is not searchable by others): chmod o+x its parent directories")
    return None


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            return
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def _enter(cgroup: cgroups.Cgroup | None, uid: int | None, unshare: Callable[[int], int] | None = None,
           time_offsets: bytes | None = None) -> Callable[[], None] | None:
    """What bwrap's process does before exec: join the sandbox's cgroups (so the cgroup namespace bwrap
    unshares is rooted at the sandbox's own cgroup, and every process of the sandbox starts in it), make
    the time namespace its processes will be in and set its clocks, then drop to the sandbox's uid (after:
    the cgroup files are root's, and the offsets need CAP_SYS_TIME). Runs between fork and exec in a
    threaded process, so it only makes system calls on values prepared here."""
    procs = [str(d / "cgroup.procs") for d in cgroup.dirs] if cgroup is not None else []
    if not procs and uid is None and time_offsets is None:
        return None

    def enter() -> None:
        me = str(os.getpid()).encode()
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        if unshare is not None and time_offsets is not None:
            if unshare(CLONE_NEWTIME) != 0:
                raise OSError("unshare(CLONE_NEWTIME) failed")
            fd = os.open("/proc/self/timens_offsets", os.O_WRONLY)  # before any process is in it
            try:
                os.write(fd, time_offsets)
            finally:
                os.close(fd)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
    return enter


CLONE_NEWTIME = 0x80


def _libc_unshare() -> Callable[[int], int]:
    """unshare(2): Python 3.11's os has none (3.12 adds os.unshare)."""
    import ctypes

    fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).unshare
    return fn


async def _wait_exit(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return
    exited: asyncio.Future[None] = loop.create_future()
    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(exited, 10)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()
